// The login form, sent as JSON so a wrong password is shown in place (the form also works
// without JavaScript: the server answers the plain POST itself).
import {errorMessage} from "./api.js";

const form = document.getElementById("login");
const problem = document.getElementById("login-error");
form?.addEventListener("submit", async (event) => {
  event.preventDefault();
  problem.textContent = "";
  const csrf = form.elements.csrf_token.value;
  const response = await fetch("/login", {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "Accept": "application/json",
              "X-Requested-With": "XMLHttpRequest", "X-CSRF-Token": csrf},
    body: JSON.stringify({user: form.elements.user.value, password: form.elements.password.value}),
  });
  if (response.ok) { location.assign(form.dataset.next || "/ui/"); return; }
  problem.textContent = response.status === 403
    ? "This form has expired; reload the page and log in again."
    : errorMessage(response.status, await response.text());
  form.elements.password.select();
  form.elements.password.focus();
});

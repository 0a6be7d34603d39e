// Users: every account with its role and state; admins create, disable and delete them.
import {ago, api, badge, el, every, poll, say, sayError, syncRows} from "./api.js";

const tbody = document.getElementById("users");
const form = document.getElementById("create");
const me = document.body.dataset.user;
let refresh = null;

async function load() {
  const users = (await poll("/v1/users")).users;
  syncRows(tbody, users, (user) => user.name, (user) => [
    user.name,
    user.role,
    user.source,
    [`s|${user.disabled}`, () => badge(user.disabled ? "disabled" : "enabled", user.disabled ? "s-warn" : "s-ok")],
    [`l|${user.last_login_at}`, () => el("span", {title: user.last_login_at || ""}, ago(user.last_login_at))],
    [`a|${user.disabled}`, () => user.name === me ? el("span", {class: "muted"}, "you") : el("span", {class: "row-actions"},
      el("button", {type: "button", class: "secondary small", "data-toggle": user.name,
                    "data-disabled": String(user.disabled),
                    "aria-label": `${user.disabled ? "Enable" : "Disable"} user ${user.name}`},
         user.disabled ? "Enable" : "Disable"),
      el("button", {type: "button", class: "danger small", "data-delete": user.name,
                    "aria-label": `Delete user ${user.name}`}, "Delete"))],
  ]);
}

tbody.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  try {
    if (button.dataset.toggle) {
      const disabled = button.dataset.disabled !== "true";
      await api("PATCH", `/v1/users/${encodeURIComponent(button.dataset.toggle)}`, {disabled});
      say(`User ${button.dataset.toggle} ${disabled ? "disabled: their sessions and tokens have ended" : "enabled"}.`);
    } else if (button.dataset.delete) {
      if (!confirm(`Delete user ${button.dataset.delete}?`)) return;
      await api("DELETE", `/v1/users/${encodeURIComponent(button.dataset.delete)}`);
      say(`User ${button.dataset.delete} deleted.`);
    }
    await refresh();
  } catch (error) { sayError(error); }
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {name: form.elements.name.value.trim(), role: form.elements.role.value,
                password: form.elements.password.value};
  try {
    await api("POST", "/v1/users", body);
    say(`User ${body.name} created (${body.role}).`);
    form.reset();
    await refresh();
    form.elements.name.focus();
  } catch (error) { sayError(error); }
});

refresh = every(15, load);

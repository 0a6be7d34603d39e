// What every page shares: calls to the /v1 API with the login cookie and the CSRF token
// (a 401 sends the browser back to /login), and a few small DOM helpers. Text is always set
// with textContent, never as HTML, so nothing from the API can inject markup.

const CSRF = document.querySelector('meta[name="csrf-token"]')?.content || "";
// X-Requested-With: the API then answers 401 without a Basic challenge (no password popup).
const HEADERS = {"X-Requested-With": "XMLHttpRequest", "Accept": "application/json",
                 "X-OpenStack-Ironic-API-Version": "latest"};

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export function toLogin() {
  const here = location.pathname + location.search;
  location.assign("/login?next=" + encodeURIComponent(here));
}

// Ironic's error body is {"error_message": "<JSON with faultstring>"}.
export function errorMessage(status, text) {
  try {
    const outer = JSON.parse(text);
    try { return JSON.parse(outer.error_message).faultstring; } catch { return outer.error_message || text; }
  } catch { return text || `HTTP ${status}`; }
}

export async function api(method, path, body, contentType, background = false) {
  const headers = {...HEADERS};
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = CSRF;
  if (background) headers["X-Labmetal-Background"] = "1";
  const init = {method, headers, credentials: "same-origin"};
  if (body !== undefined) {
    headers["Content-Type"] = contentType || "application/json";
    init.body = contentType ? body : JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) { toLogin(); throw new ApiError(401, "Your session has ended"); }
  const text = await response.text();
  if (!response.ok) throw new ApiError(response.status, errorMessage(response.status, text));
  return text ? JSON.parse(text) : null;
}

// A page's periodic refresh: a GET that does not count as use, so a page left open still
// lets its session end after the idle timeout (the server checks the session all the same).
export const poll = (path) => api("GET", path, undefined, undefined, true);

// A PUT of a file with upload progress (fetch has none): onProgress(sent, total).
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", path);
    for (const [name, value] of Object.entries(HEADERS)) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader("X-CSRF-Token", CSRF);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (event) => onProgress(event.loaded, event.lengthComputable ? event.total : file.size);
    xhr.onload = () => {
      if (xhr.status === 401) { toLogin(); reject(new ApiError(401, "Your session has ended")); }
      else if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(new ApiError(xhr.status, errorMessage(xhr.status, xhr.responseText)));
    };
    xhr.onerror = () => reject(new ApiError(0, "The connection to the server was lost"));
    xhr.send(file);
  });
}

// -- the page ------------------------------------------------------------------------------
export const role = document.body.dataset.role;
const allowed = new Set((document.body.dataset.can || "").split(" "));
export const can = (action) => allowed.has(action);

const flash = document.getElementById("flash");
export function say(message, isError = false) {
  flash.classList.toggle("error", isError);
  flash.setAttribute("role", isError ? "alert" : "status");
  flash.textContent = message;
}
export const sayError = (error) => say(error.message || String(error), true);

// el("td", {class: "x", title: "y"}, "text", child...) -> an element.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Rows are updated in place, keyed, and a cell only when its content changed: a refresh
// every few seconds must not move the keyboard focus or the screen reader's place.
// cells(item) gives one spec per column: a string, or [signature, () => node].
export function syncRows(tbody, items, key, cells) {
  const old = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
  let previous = null;
  for (const item of items) {
    const id = String(key(item));
    let row = old.get(id);
    old.delete(id);
    if (!row) { row = el("tr", {"data-key": id}); }
    const specs = cells(item);
    specs.forEach((spec, index) => {
      const [signature, build] = Array.isArray(spec) ? spec : [String(spec ?? ""), () => String(spec ?? "")];
      let cell = row.cells[index];
      if (!cell) { cell = el(index === 0 ? "th" : "td", index === 0 ? {scope: "row"} : {}); row.append(cell); }
      if (cell.dataset.sig !== signature) { cell.dataset.sig = signature; cell.replaceChildren(build()); }
    });
    const expected = previous ? previous.nextSibling : tbody.firstChild;
    if (row !== expected) tbody.insertBefore(row, expected);
    previous = row;
  }
  for (const row of old.values()) row.remove();
}

// Re-run load() every `seconds`, skipping a beat while the tab is hidden or a call is out.
export function every(seconds, load) {
  let busy = false;
  const tick = async () => {
    if (busy || document.hidden) return;
    busy = true;
    try { await load(); } catch (error) { if (error.status !== 401) sayError(error); } finally { busy = false; }
  };
  tick();
  setInterval(tick, seconds * 1000);
  return tick;
}

export function bytes(value) {
  if (value === null || value === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = value, unit = 0;
  while (n >= 1024 && unit < units.length - 1) { n /= 1024; unit++; }
  return `${unit ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[unit]}`;
}

export function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

// A node's provision state (with its target) as a badge: colour and text.
export function stateClass(state) {
  if (!state) return "s-idle";
  if (/fail|error/.test(state)) return "s-bad";
  if (["active", "available", "manageable", "power on", "done"].includes(state)) return "s-ok";
  if (["enroll", "power off", "idle", "cancelled"].includes(state)) return "s-idle";
  return "s-busy";
}

export function badge(text, cls) {
  return el("span", {class: `badge ${cls || stateClass(text)}`}, text || "unknown");
}

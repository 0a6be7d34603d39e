// Sessions: a student's own sessions of TP templates (teachers and admins: everybody's),
// polled every 5 s and updated in place. Create one from a template; open one to start it
// on a seat, stop it, save it with a label, go back to a save point or to the template;
// download its disk (or a save point's) as a qcow2 image while it is stopped.
// The API's refusals (a busy seat, a quota, the storage down) land in the alert area.
import {ago, api, badge, bytes, can, el, every, poll, role, say, sayError, syncRows, when} from "./api.js";

const tbody = document.getElementById("sessions");
const createForm = document.getElementById("create");
const panel = document.getElementById("panel");
const heading = document.getElementById("panel-h");
const startForm = document.getElementById("start");
const saveForm = document.getElementById("save");
const stopBox = document.getElementById("stop-box");
const resetButton = document.getElementById("reset");
const savesBody = document.getElementById("saves");
const staff = role !== "student";
const BUSY = ["starting", "running", "syncing"];
// How a session runs (issue 16): from the seat's own disk, synced to the store when it ends,
// or diskless over iSCSI (seats without a disk, templates that cannot boot locally).
const MODE = {local: "from the seat's disk (synced to your store when it ends)",
              iscsi: "diskless, over the network (iSCSI)"};
const WHY = {409: "Conflict", 413: "Over quota", 503: "Storage unavailable"};
let sessions = [];
let open = null; // the uuid of the session shown in the panel

const stateClass = (state) => ({running: "s-ok", starting: "s-busy", syncing: "s-busy", stopped: "s-idle", failed: "s-bad"}[state] || "s-idle");
const title = (ses) => `${ses.template} v${ses.template_version}`;
const who = (ses) => staff ? ` of ${ses.student}` : "";

function fail(error) {
  const why = WHY[error.status];
  sayError(why ? {message: `${why}: ${error.message}`} : error);
}

function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

async function loadTemplates() {
  const templates = (await poll("/v1/templates")).templates.filter((t) => t.latest_version);
  const select = createForm.elements.template;
  const mine = new Set(staff ? [] : sessions.map((ses) => ses.template));
  const options = templates.map((t) => el("option", {value: t.name, disabled: mine.has(t.name)},
    `${t.name} (version ${t.latest_version})${t.description ? ` — ${t.description}` : ""}${mine.has(t.name) ? " — you have one" : ""}`));
  const signature = options.map((o) => o.textContent).join("|");
  if (select.dataset.sig === signature) return;
  const chosen = select.value;
  select.dataset.sig = signature;
  select.replaceChildren(...options);
  const free = templates.find((t) => !mine.has(t.name));
  if (!free) select.prepend(el("option", {value: ""}, templates.length
    ? "you have a session of every template" : "no template yet: ask your teacher"));
  createForm.querySelector("button").disabled = !free;
  select.value = templates.some((t) => t.name === chosen && !mine.has(chosen)) ? chosen : free?.name || "";
}

async function loadSeats() {
  // Staff may list the nodes: a select of them. Students may not (policy): the text field stays.
  if (!can("node:get") || document.getElementById("seat").tagName === "SELECT") return;
  const nodes = (await poll("/v1/nodes")).nodes;
  const select = el("select", {id: "seat", name: "seat", required: true, "aria-describedby": "seat-help"},
    nodes.map((node) => el("option", {value: node.name || node.uuid}, node.name || node.uuid)));
  document.getElementById("seat-box").replaceChildren(select);
  setText(document.getElementById("seat-help"), "a PC of the rooms");
}

async function load() {
  sessions = (await poll("/v1/sessions")).sessions;
  syncRows(tbody, sessions, (ses) => ses.uuid, (ses) => [
    [`t|${title(ses)}`, () => el("span", {}, ses.template, " ", el("span", {class: "muted"}, `version ${ses.template_version}`))],
    ...(staff ? [ses.student] : []),
    [`s|${ses.state}|${ses.last_error}`, () => el("span", {title: ses.last_error || ""}, badge(ses.state, stateClass(ses.state)))],
    ses.seat || "",
    [`l|${ses.last_saved_at}`, () => el("span", {title: when(ses.last_saved_at)}, ses.last_saved_at ? ago(ses.last_saved_at) : "never")],
    [`u|${ses.used_bytes}|${ses.size}`, () => el("span", {class: "num", title: `of a ${bytes(ses.size)} disk`}, bytes(ses.used_bytes))],
    [`a|${ses.uuid === open}|${BUSY.includes(ses.state)}`, () => el("span", {},
      el("button", {type: "button", class: "secondary small", "data-open": ses.uuid,
        "aria-expanded": String(ses.uuid === open), "aria-controls": "panel",
        "aria-label": `Open session ${title(ses)}${who(ses)}`}, "Open"),
      " ", download(ses, null, `the disk of session ${title(ses)}${who(ses)}`, "Download disk"))],
  ]);
  document.getElementById("empty").hidden = sessions.length > 0;
  tbody.closest("table").hidden = !sessions.length;
  if (can("session:create")) await loadTemplates();
  if (open) await renderPanel();
}

async function renderPanel() {
  const ses = sessions.find((each) => each.uuid === open);
  if (!ses) { closePanel(); return; }
  panel.hidden = false;
  setText(heading, `Session ${title(ses)}${who(ses)}`);
  const facts = [["State", ses.state === "syncing"
                   ? "syncing: its seat is uploading it (it powers that seat on if needed)" : ses.state],
                 ["Runs", MODE[ses.mode] || ses.mode || ""], ["Seat", ses.seat || "none"],
                 ...(ses.mode === "local"
                   ? [["Last synced", ses.synced_at ? when(ses.synced_at) : "never"]] : []),
                 ["Last saved", ses.last_saved_at ? when(ses.last_saved_at) : "never"],
                 ["Used", `${bytes(ses.used_bytes)} (of a ${bytes(ses.size)} disk)`],
                 ["Created", `${when(ses.created_at)} by ${ses.created_by}`]];
  const box = document.getElementById("facts");
  const signature = JSON.stringify(facts);
  if (box.dataset.sig !== signature) {
    box.dataset.sig = signature;
    box.replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  }
  const error = document.getElementById("panel-error");
  error.hidden = !ses.last_error;
  setText(error, ses.last_error || "");
  const busy = BUSY.includes(ses.state);
  startForm.hidden = busy || !can("session:resume");
  stopBox.hidden = !busy || !can("session:resume");
  saveForm.hidden = ses.state === "starting" || !can("session:save");
  resetButton.hidden = !can("session:reset");
  resetButton.disabled = busy;
  resetButton.title = busy ? "stop the session first" : "";
  const saves = (await poll(`/v1/sessions/${ses.uuid}/saves`)).saves;
  syncRows(savesBody, saves, (save) => save.uuid, (save) => [
    String(save.number), save.label,
    [`w|${save.created_at}`, () => el("span", {title: when(save.created_at)}, ago(save.created_at))],
    save.created_by,
    [`r|${busy}`, () => el("span", {},
      can("session:reset") ? el("button", {type: "button", class: "secondary small",
        "data-revert": save.uuid, "data-label": save.label, disabled: busy, title: busy ? "stop the session first" : null,
        "aria-label": `Revert to save ${save.number}, ${save.label}`}, "Revert") : null,
      " ", download(ses, save, `the disk at save ${save.number}, ${save.label}`, "Download"))],
  ]);
  document.getElementById("no-saves").hidden = saves.length > 0;
  savesBody.closest("table").hidden = !saves.length;
}

// A copy of the disk (or of a save point) as a qcow2 file: a plain link, the browser downloads
// it. Not while a seat uses the session (the API refuses: the seat could write during the copy).
function download(ses, save, what, text) {
  if (!can("session:export")) return null;
  if (BUSY.includes(ses.state)) {
    return el("button", {type: "button", class: "secondary small", disabled: true,
      title: "stop the session first", "aria-label": `Download ${what}: stop the session first`}, text);
  }
  const query = save ? `?format=qcow2&save=${encodeURIComponent(save.uuid)}` : "?format=qcow2";
  return el("a", {href: `/v1/sessions/${ses.uuid}/disk${query}`, download: "", class: "small",
    "data-download": save ? save.uuid : ses.uuid, "aria-label": `Download ${what} (qcow2 image)`}, text);
}

function openPanel(uuid) {
  open = uuid;
  savesBody.replaceChildren();
  document.getElementById("facts").dataset.sig = "";
  return load().then(() => heading.focus(), fail);
}

function closePanel() {
  const was = open;
  open = null;
  panel.hidden = true;
  if (was) tbody.querySelector(`[data-open="${was}"]`)?.focus();
}

// One step on the open session: the API call, a message, the page brought up to date.
async function step(call, message) {
  let answer;
  try {
    answer = await call();
  } catch (error) { fail(error); return false; }
  say(answer && answer.queued ? `Save "${answer.queued}" queued: ${answer.message}.` : message);
  try { await load(); } catch (error) { fail(error); }
  return true;
}
const path = () => `/v1/sessions/${open}`;
const current = () => sessions.find((each) => each.uuid === open);

tbody.addEventListener("click", (event) => {
  const uuid = event.target.closest("[data-open]")?.dataset.open;
  if (uuid) openPanel(uuid);
});

createForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const template = createForm.elements.template.value;
  if (!template) { say("Choose a template first.", true); return; }
  try {
    const ses = await api("POST", "/v1/sessions", {template});
    say(`Session of ${template} version ${ses.template_version} created: start it on a seat below.`);
    await openPanel(ses.uuid);
  } catch (error) { fail(error); }
});

startForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const seat = startForm.elements.seat.value.trim();
  if (!seat) { say("Give the seat's name.", true); startForm.elements.seat.focus(); return; }
  const ses = current();
  const done = await step(() => api("POST", `${path()}/start`, {seat}),
                          `Session ${title(ses)}${who(ses)} is running on seat ${seat}: boot that PC.`);
  if (done) document.getElementById("stop").focus();
});

document.getElementById("stop").addEventListener("click", async () => {
  const ses = current();
  const done = await step(() => api("POST", `${path()}/stop`), ses.mode === "local" && ses.state !== "starting"
    ? `Session ${title(ses)}${who(ses)} is ending: its seat uploads it to your store, then it is stopped.`
    : `Session ${title(ses)}${who(ses)} stopped; its data stays.`);
  if (done && !startForm.hidden) startForm.elements.seat.focus();
});

saveForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const label = saveForm.elements.label.value.trim();
  if (!label) { say("Give the save a label.", true); saveForm.elements.label.focus(); return; }
  const done = await step(() => api("POST", `${path()}/save`, {label}), `Saved as "${label}".`);
  if (done) saveForm.reset();
});

savesBody.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-revert]");
  if (!button) return;
  const label = button.dataset.label;
  if (!confirm(`Go back to save "${label}"? The changes made since are lost (later save points stay).`)) return;
  await step(() => api("POST", `${path()}/revert`, {save: button.dataset.revert}),
             `Session reverted to save "${label}".`);
  heading.focus();
});

resetButton.addEventListener("click", async () => {
  const ses = current();
  if (!ses) return;
  if (!confirm(`Reset session ${title(ses)}${who(ses)} to its template? All its changes and save points are lost.`)) return;
  await step(() => api("POST", `${path()}/reset`), `Session ${title(ses)}${who(ses)} reset to its template.`);
  heading.focus();
});

document.getElementById("close").addEventListener("click", closePanel);

document.getElementById("create-section").hidden = !can("session:create");
every(5, load);
if (can("node:get")) loadSeats().catch(fail);

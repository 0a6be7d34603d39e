// A room as a grid of seats: each seat's job state (colour and text), progress and last
// error, polled every 2 s and updated in place; deploy now or at a time, re-image a seat,
// power the room off, cancel the job, open the room for a TP (students' sessions). The
// summary line is the screen readers' live region.
import {api, can, el, every, poll, say, sayError, when} from "./api.js";

const box = document.getElementById("room");
const ident = box.dataset.ident;
const path = `/v1/rooms/${encodeURIComponent(ident)}`;
const grid = document.getElementById("seats");
const summary = document.getElementById("summary");
const jobText = document.getElementById("job");
const cancel = document.getElementById("cancel");
const powerOff = document.getElementById("power-off");
const form = document.getElementById("deploy");
const FINISHED = ["done", "failed", "cancelled"];
const ORDER = ["done", "writing", "verifying", "booting_os", "booting", "powering", "queued",
               "failed", "cancelled", "idle"];
const tiles = new Map();
let room = null;
let imagesLoaded = false;

function seatClass(state) {
  return {done: "s-ok", failed: "s-bad", cancelled: "s-warn", idle: "s-idle", queued: "s-idle"}[state] || "s-busy";
}
const stateText = (state) => state.replace("_", " ");

function tile(label) {
  const parts = {
    state: el("span", {class: "badge"}),
    node: el("span", {class: "seat-node"}),
    fill: el("span"),
    percent: el("span"),
    power: el("span"),
    student: el("span", {class: "seat-student"}),
    tries: el("span"),
    error: el("details", {hidden: true},
              el("summary", {}, "Error", el("span", {class: "brief"})), el("p")),
    button: el("button", {type: "button", class: "secondary small", "data-seat": label,
                          "aria-label": `Re-image seat ${label}`}, "Re-image"),
  };
  parts.bar = el("div", {class: "bar", role: "progressbar", "aria-valuemin": "0",
                         "aria-valuemax": "100", "aria-label": `Seat ${label} progress`}, parts.fill);
  parts.root = el("li", {class: "seat", "data-label": label},
    el("div", {class: "seat-head"}, el("span", {class: "seat-label"}, label), parts.state),
    el("div", {class: "seat-meta"}, parts.node, parts.power), parts.bar,
    el("div", {class: "seat-meta"}, parts.percent, parts.tries),
    el("div", {class: "seat-meta"}, parts.student),
    parts.error,
    el("div", {class: "seat-actions"}, parts.button));
  return parts;
}

function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

function renderSeat(parts, seat) {
  const cls = seatClass(seat.state);
  parts.root.className = `seat ${cls}`;
  parts.state.className = `badge ${cls}`;
  setText(parts.state, stateText(seat.state));
  setText(parts.node, seat.node_name || seat.node_uuid);
  parts.node.title = `node ${seat.node_name || ""} ${seat.node_uuid}, ${seat.provision_state}`;
  const progress = Math.max(0, Math.min(100, seat.progress || 0));
  parts.fill.style.width = `${progress}%`;
  parts.bar.setAttribute("aria-valuenow", String(progress));
  parts.bar.setAttribute("aria-valuetext", `${stateText(seat.state)}, ${progress} %`);
  // a percentage only where there is one: while writing, and after (a failed write's too)
  const measured = ["writing", "verifying", "done"].includes(seat.state) ||
                   (seat.state === "failed" && progress > 0);
  setText(parts.percent, seat.state === "idle" ? seat.provision_state || "" :
                         measured ? `${progress} %` : "");
  setText(parts.tries, seat.attempts > 1 ? `attempt ${seat.attempts}` : "");
  setText(parts.student, seat.student ? `session of ${seat.student}` : "");
  setText(parts.power, seat.power_state || "power unknown");
  parts.power.title = `power state: ${seat.power_state || "unknown"}`;
  const error = seat.error || (seat.state === "idle" ? seat.last_error : null) || "";
  parts.error.hidden = !error;
  setText(parts.error.querySelector(".brief"), error ? `: ${error}` : "");
  setText(parts.error.lastChild, error);
  const busy = seat.state !== "idle" && !FINISHED.includes(seat.state);
  parts.button.disabled = busy || !can("room:deploy");
}

function renderSummary(seats) {
  const counts = {};
  for (const seat of seats) counts[seat.state] = (counts[seat.state] || 0) + 1;
  const states = Object.keys(counts).sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
  const text = seats.length ? states.map((state) => `${counts[state]} ${stateText(state)}`).join(", ") : "";
  setText(summary, text);
}

function renderJob(job) {
  cancel.hidden = !(job && job.state === "running") || !can("room:deploy");
  const what = (each) => each.action === "deploy" ? `Deploy ${each.image}` :
    each.action === "cache" ? `TP template ${each.image} into the seats' caches` : "Power off";
  if (job) {
    const how = ["deploy", "cache"].includes(job.action) ? ` over ${job.chosen_transport || job.transport}` : "";
    const times = job.finished_at ? `, finished ${when(job.finished_at)}` :
                  job.started_at ? `, started ${when(job.started_at)}` : "";
    setText(jobText, `${what(job)}${how}: ${job.state}${times}${job.created_by ? ` (by ${job.created_by})` : ""}.`);
  } else {
    setText(jobText, "No job has run in this room yet.");
  }
  const jobError = document.getElementById("job-error");
  jobError.hidden = !job?.last_error;
  setText(jobError, job?.last_error || "");
  const list = document.getElementById("scheduled");
  const scheduled = room.scheduled || [];
  const signature = scheduled.map((each) => `${each.uuid}|${each.scheduled_at}`).join(",");
  if (list.dataset.sig !== signature) {
    list.dataset.sig = signature;
    list.replaceChildren(...scheduled.map((each) => {
      const text = `Scheduled: ${what(each)} at ${when(each.scheduled_at)}${each.repeat ? ` (${each.repeat})` : ""}`;
      return el("li", {}, el("span", {}, text), " ", can("room:deploy") ? el("button", {
        type: "button", class: "secondary small", "data-cancel": each.uuid,
        "aria-label": `Cancel: ${text}`}, "Cancel") : "");
    }));
  }
}

async function loadImages() {
  const images = (await poll("/v1/images")).images
    .filter((image) => image.status === "active" && ["whole-disk", "partition"].includes(image.kind));
  const select = form.elements.image;
  select.replaceChildren(...images.map((image) => el("option", {value: image.name}, image.name)));
  if (!images.length) select.append(el("option", {value: ""}, "no image is ready yet"));
  const latest = room?.job?.image;
  if (latest && images.some((image) => image.name === latest)) select.value = latest;
  imagesLoaded = true;
}

async function load() {
  room = await poll(path);
  document.getElementById("title").textContent = `Room ${room.name}`;
  setText(document.getElementById("description"), room.description || "");
  const labels = new Set(room.seats.map((seat) => seat.label));
  for (const [label, parts] of tiles) if (!labels.has(label)) { parts.root.remove(); tiles.delete(label); }
  room.seats.forEach((seat, index) => {
    let parts = tiles.get(seat.label);
    if (!parts) { parts = tile(seat.label); tiles.set(seat.label, parts); }
    if (grid.children[index] !== parts.root) grid.insertBefore(parts.root, grid.children[index] || null);
    renderSeat(parts, seat);
  });
  document.getElementById("empty").hidden = room.seats.length > 0;
  renderSummary(room.seats);
  renderJob(room.job);
  renderTp(room.tp);
  if (!imagesLoaded) await loadImages();
}

const tpForm = document.getElementById("tp");
const tpEnd = document.getElementById("tp-end");
let templatesLoaded = false;

function renderTp(tp) {
  setText(document.getElementById("tp-state"), tp
    ? `Open for TP ${tp.template} (started by ${tp.started_by} ${when(tp.started_at)}).`
    : "The room is not open for a TP.");
  tpEnd.hidden = !tp;
  if (tp && templatesLoaded) tpForm.elements.template.value = tp.template;
}

async function loadTemplates() {
  const templates = (await poll("/v1/templates")).templates.filter((each) => each.latest_version);
  const select = tpForm.elements.template;
  select.replaceChildren(...templates.map((each) => el("option", {value: each.name}, each.name)));
  if (!templates.length) select.append(el("option", {value: ""}, "no template yet"));
  templatesLoaded = true;
  if (room?.tp) select.value = room.tp.template;
}

const refresh = every(2, load);

async function startJob(body, message) {
  try {
    await api("POST", `${path}/jobs`, body);
    say(message);
    await refresh();
  } catch (error) { sayError(error); }
}

grid.addEventListener("click", async (event) => {
  const label = event.target.closest("[data-seat]")?.dataset.seat;
  if (!label || !room) return;
  const job = room.job;
  const seat = job?.seats?.find((each) => each.label === label);
  if (job && job.action === "deploy" && job.state !== "cancelled" && seat) {
    try {
      await api("POST", `/v1/room-jobs/${job.uuid}/seats/${encodeURIComponent(label)}/retry`);
      say(`Seat ${label} is queued to be imaged again with ${job.image}.`);
      await refresh();
    } catch (error) { sayError(error); }
    return;
  }
  const image = form.elements.image.value;
  if (!image) { say("Choose an image in the deploy form first.", true); return; }
  await startJob({image, seats: [label], transport: "unicast", retries: Number(form.elements.retries.value)},
                 `Seat ${label} is being imaged with ${image}.`);
});

async function cancelJob(uuid, question) {
  if (!confirm(question)) return;
  try { await api("POST", `/v1/room-jobs/${uuid}/cancel`); say("Job cancelled."); await refresh(); }
  catch (error) { sayError(error); }
}
cancel.addEventListener("click", () => {
  if (room?.job) cancelJob(room.job.uuid, "Cancel this job? Seats not finished stop where they are.");
});
document.getElementById("scheduled").addEventListener("click", (event) => {
  const uuid = event.target.closest("[data-cancel]")?.dataset.cancel;
  if (uuid) cancelJob(uuid, "Cancel this scheduled job?");
});

powerOff.hidden = !can("room:power");
powerOff.addEventListener("click", () => {
  if (!confirm(`Power off every seat of room ${room?.name || ident}?`)) return;
  startJob({action: "power-off", at: null}, "The room is being powered off.");
});

for (const radio of form.elements.when) {
  radio.addEventListener("change", () => { form.elements.at.disabled = form.elements.when.value !== "at"; });
}
form.addEventListener("submit", (event) => {
  event.preventDefault();
  const at = form.elements.when.value === "at" ? form.elements.at.value : "";
  if (form.elements.when.value === "at" && !at) { say("Give the date and time of the deploy.", true); form.elements.at.focus(); return; }
  const body = {image: form.elements.image.value, transport: form.elements.transport.value,
                retries: Number(form.elements.retries.value), seats: null,
                at: at ? new Date(at).toISOString() : null};
  startJob(body, at ? `Deploy of ${body.image} scheduled for ${new Date(at).toLocaleString()}.`
                    : `Deploy of ${body.image} to every seat started.`);
});

if (can("room:update")) {
  const importForm = document.getElementById("import");
  document.getElementById("import-section").hidden = false;
  importForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = document.getElementById("import-result");
    try {
      const text = await importForm.elements.csv.files[0].text();
      const answer = await api("POST", `${path}/import`, text, "text/csv");
      result.textContent = `Imported: ${answer.created} node(s) created, ${answer.updated} updated.`;
      importForm.reset();
      await refresh();
    } catch (error) { result.textContent = ""; sayError(error); }
  });
}
if (!can("room:deploy")) {
  form.closest("section").hidden = true;
  document.getElementById("tp-section").hidden = true;
} else {
  loadTemplates().catch(sayError);
  tpForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const template = tpForm.elements.template.value;
    if (!template) { say("Make a template first (Templates).", true); return; }
    try {
      const opened = await api("PUT", `${path}/tp`, {template, power_on: tpForm.elements.power_on.checked});
      const left = Object.entries(opened.not_powered).map(([label, why]) => `${label}: ${why}`);
      say(`Room open for TP ${template}: ${opened.powered_on.length} seat(s) powering on.` +
          (left.length ? ` Not powered on: ${left.join("; ")}.` : ""), left.length > 0);
      await refresh();
    } catch (error) { sayError(error); }
  });
  tpEnd.addEventListener("click", async () => {
    try { await api("DELETE", `${path}/tp`); say("TP ended; running sessions go on until their seats are off."); await refresh(); }
    catch (error) { sayError(error); }
  });
}

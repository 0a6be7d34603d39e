// One node: its state, power and provisioning actions (only those its state allows), and its
// history; refreshed every 3 s in place.
import {api, badge, can, el, every, poll, say, sayError, syncRows, when} from "./api.js";

const box = document.getElementById("node");
const ident = box.dataset.ident;
const verbsByState = JSON.parse(box.dataset.verbs);
const facts = document.getElementById("facts");
const verbBox = document.getElementById("verbs");
const path = `/v1/nodes/${encodeURIComponent(ident)}`;
const VERB_LABELS = {manage: "Manage", provide: "Provide", deploy: "Deploy", active: null,
                     rebuild: "Re-image (rebuild)", undeploy: "Undeploy", deleted: null,
                     inspect: "Inspect", abort: "Abort"};
let node = null;

function fact(name, value) {
  return [el("dt", {}, name), el("dd", {}, value ?? "")];
}

function renderFacts() {
  const arrow = (s, t) => t && t !== s ? `${s || "none"} → ${t}` : s;
  document.getElementById("title").textContent = `Node ${node.name || node.uuid}`;
  document.title = `Node ${node.name || node.uuid} · labmetal`;
  facts.replaceChildren(...[
    fact("UUID", el("code", {}, node.uuid)),
    fact("Power", badge(arrow(node.power_state, node.target_power_state) || "unknown")),
    fact("Provision state", badge(arrow(node.provision_state, node.target_provision_state))),
    fact("Last error", node.last_error ? el("span", {class: "error-text"}, node.last_error) : "none"),
    fact("Conductor", node.conductor || "none"),
    fact("Driver", `${node.driver} (power: ${node.power_interface || "?"}, deploy: ${node.deploy_interface})`),
    fact("Image", node.instance_info?.image_source || "none"),
    fact("Maintenance", node.maintenance ? `yes: ${node.maintenance_reason || "no reason given"}` : "no"),
    fact("Updated", when(node.updated_at || node.created_at)),
  ].flat());
}

function renderActions() {
  const busy = Boolean(node.target_power_state || node.target_provision_state);
  for (const button of box.querySelectorAll("[data-power]")) {
    button.disabled = busy || !can("node:set_power_state");
  }
  const verbs = (verbsByState[node.provision_state] || []).filter((verb) => VERB_LABELS[verb]);
  const signature = verbs.join(",") + (can("node:set_provision_state") ? "" : "!");
  if (verbBox.dataset.sig !== signature) {
    verbBox.dataset.sig = signature;
    verbBox.replaceChildren(...(verbs.length ? verbs.map((verb) => el("button", {
      type: "button", class: verb === "abort" || verb === "undeploy" ? "danger" : "secondary",
      "data-verb": verb, disabled: !can("node:set_provision_state"),
    }, VERB_LABELS[verb])) : [el("span", {class: "muted"}, "none in this state")]));
  }
}

async function act(what, body, label) {
  try {
    await api("PUT", `${path}/states/${what}`, body);
    say(`${label}: requested for ${node.name || node.uuid}.`);
    await load();
  } catch (error) { sayError(error); }
}

box.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (!button || !node) return;
  if (button.dataset.power) act("power", {target: button.dataset.power}, button.textContent);
  if (button.dataset.verb) {
    const verb = button.dataset.verb;
    if (["undeploy", "rebuild"].includes(verb) &&
        !confirm(`${button.textContent} ${node.name || node.uuid}? Its disk will be ${verb === "rebuild" ? "rewritten" : "released"}.`)) return;
    act("provision", {target: verb}, button.textContent);
  }
});

async function load() {
  node = await poll(path);
  renderFacts();
  renderActions();
  const history = (await poll(`${path}/history?detail=true`)).history.slice().reverse();
  syncRows(document.getElementById("history"), history, (row) => row.uuid, (row) => [
    when(row.created_at),
    [`s|${row.severity}`, () => badge(row.severity, row.severity === "ERROR" ? "s-bad" : "s-idle")],
    row.event_type || "", row.event, row.user || "", row.conductor || "",
  ]);
}

every(3, load);

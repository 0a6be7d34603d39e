// Nodes: every node's power and provision state, conductor and last error, refreshed every
// 5 s in place; the filter narrows the table without a reload.
import {badge, el, every, poll, syncRows} from "./api.js";

const tbody = document.getElementById("nodes");
const filter = document.getElementById("filter");
const errorsOnly = document.getElementById("errors-only");
const count = document.getElementById("count");
let nodes = [];

const arrow = (state, target) => target && target !== state ? `${state || "none"} → ${target}` : state;

function matches(node) {
  if (errorsOnly.checked && !node.last_error) return false;
  const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
  const text = [node.name, node.uuid, node.power_state, node.provision_state,
                node.target_provision_state, node.conductor, node.last_error,
                node.maintenance ? "maintenance" : ""].join(" ").toLowerCase();
  return words.every((word) => text.includes(word));
}

function render() {
  const shown = nodes.filter(matches);
  syncRows(tbody, shown, (node) => node.uuid, (node) => [
    [`${node.name}|${node.uuid}`, () => el("a", {href: `/ui/nodes/${node.uuid}`}, node.name || node.uuid)],
    [`${node.power_state}|${node.target_power_state}`,
     () => badge(arrow(node.power_state, node.target_power_state) || "unknown")],
    [`${node.provision_state}|${node.target_provision_state}`,
     () => badge(arrow(node.provision_state, node.target_provision_state))],
    node.conductor || "none",
    [`e|${node.last_error || ""}`, () => node.last_error
      ? el("span", {class: "clip error-text", title: node.last_error}, node.last_error) : ""],
    [`m|${node.maintenance}|${node.maintenance_reason}`, () => node.maintenance
      ? el("span", {title: node.maintenance_reason || ""}, badge("maintenance", "s-warn")) : "no"],
  ]);
  document.getElementById("empty").hidden = nodes.length > 0;
  count.textContent = nodes.length ? `${shown.length} of ${nodes.length} nodes` : "";
}

filter.addEventListener("input", render);
errorsOnly.addEventListener("change", render);
every(5, async () => { nodes = (await poll("/v1/nodes/detail")).nodes; render(); });

// Conductors: which are online and how long since each one's last heartbeat.
import {ago, badge, el, every, poll, syncRows, when} from "./api.js";

const tbody = document.getElementById("conductors");

every(5, async () => {
  const conductors = (await poll("/v1/conductors?detail=true")).conductors;
  syncRows(tbody, conductors, (c) => c.hostname, (c) => [
    c.hostname,
    [`a|${c.alive}`, () => badge(c.alive ? "online" : "offline", c.alive ? "s-ok" : "s-bad")],
    [`h|${c.updated_at}|${Math.floor(Date.now() / 5000)}`, () => el("span", {title: when(c.updated_at)}, ago(c.updated_at))],
    (c.drivers || []).join(", "),
    when(c.created_at),
  ]);
  document.getElementById("empty").hidden = conductors.length > 0;
});

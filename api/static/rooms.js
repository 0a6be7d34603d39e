// Rooms: the list (a room opens as its seat grid); admins create rooms here.
import {api, can, el, every, poll, say, sayError, syncRows} from "./api.js";

const tbody = document.getElementById("rooms");
let refresh = null;

async function load() {
  const rooms = (await poll("/v1/rooms")).rooms;
  syncRows(tbody, rooms, (room) => room.uuid, (room) => [
    [`${room.name}`, () => el("a", {href: `/ui/rooms/${encodeURIComponent(room.name)}`}, room.name)],
    room.description || "",
    String(room.seat_count),
  ]);
  for (const row of tbody.rows) row.cells[2]?.classList.add("num");
  document.getElementById("empty").hidden = rooms.length > 0;
}

if (can("room:create")) {
  const form = document.getElementById("create");
  document.getElementById("create-section").hidden = false;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {name: form.elements.name.value.trim(),
                  description: form.elements.description.value.trim() || null};
    try {
      await api("POST", "/v1/rooms", body);
      say(`Room ${body.name} created: open it to import its seats.`);
      form.reset();
      await refresh();
    } catch (error) { sayError(error); }
  });
}

refresh = every(10, load);

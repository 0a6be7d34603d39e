// Images: the registered images with format, sizes and checksum; admins upload a new one
// (registered first, then its data sent with a progress bar) and delete unused ones.
import {api, badge, bytes, can, el, every, poll, say, sayError, syncRows, upload} from "./api.js";

const tbody = document.getElementById("images");
const form = document.getElementById("upload");
const progress = document.getElementById("progress");
const progressText = document.getElementById("progress-text");
let refresh = null;

async function load() {
  const images = (await poll("/v1/images")).images;
  syncRows(tbody, images, (image) => image.uuid, (image) => [
    image.name,
    image.kind,
    image.disk_format || "",
    [`s|${image.size}`, () => el("span", {title: image.size === null ? "" : `${image.size} bytes`}, bytes(image.size))],
    [`v|${image.virtual_size}`, () => el("span", {title: image.virtual_size === null ? "" : `${image.virtual_size} bytes`}, bytes(image.virtual_size))],
    [`h|${image.sha256}`, () => image.sha256
      ? el("code", {class: "hash", title: image.sha256, "data-sha256": image.sha256}, `${image.sha256.slice(0, 16)}…`) : ""],
    [`st|${image.status}`, () => badge(image.status, image.status === "active" ? "s-ok" : "s-warn")],
    [`d|${image.uuid}`, () => can("image:delete") ? el("button", {
      type: "button", class: "danger small", "data-delete": image.name,
      "aria-label": `Delete image ${image.name}`}, "Delete") : ""],
  ]);
  for (const cell of tbody.querySelectorAll("tr > :nth-child(4), tr > :nth-child(5)")) cell.classList.add("num");
  document.getElementById("empty").hidden = images.length > 0;
}

tbody.addEventListener("click", async (event) => {
  const name = event.target.closest("[data-delete]")?.dataset.delete;
  if (!name || !confirm(`Delete image ${name}? Its data is removed.`)) return;
  try { await api("DELETE", `/v1/images/${encodeURIComponent(name)}`); say(`Image ${name} deleted.`); await refresh(); }
  catch (error) { sayError(error); }
});

function showProgress(sent, total) {
  const percent = total ? Math.floor(100 * sent / total) : 0;
  progress.value = percent;
  progressText.textContent = `${percent} % (${bytes(sent)} of ${bytes(total)})`;
}

if (can("image:create") && can("image:upload")) {
  document.getElementById("upload-section").hidden = false;
  const file = form.elements.file;
  const kind = form.elements.kind;
  file.addEventListener("change", () => {
    if (file.files[0] && !form.elements.name.value) {
      form.elements.name.value = file.files[0].name.replace(/[^A-Za-z0-9._~-]/g, "-");
    }
  });
  kind.addEventListener("change", () => {
    for (const p of form.querySelectorAll(".partition-only")) p.hidden = kind.value !== "partition";
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = file.files[0];
    const body = {name: form.elements.name.value.trim(), kind: kind.value};
    if (form.elements.sha256.value.trim()) body.sha256 = form.elements.sha256.value.trim();
    if (kind.value === "partition") {
      body.kernel = form.elements.kernel.value.trim();
      body.ramdisk = form.elements.ramdisk.value.trim();
    }
    const button = document.getElementById("upload-button");
    button.disabled = true;
    document.getElementById("progress-box").hidden = false;
    showProgress(0, data.size);
    let image = null;
    try {
      image = await api("POST", "/v1/images", body);
      const done = await upload(`/v1/images/${image.uuid}/data`, data, showProgress);
      showProgress(data.size, data.size);
      progressText.textContent = `100 %: ${done.name} is active, sha256 ${done.sha256}`;
      say(`Image ${done.name} uploaded (${bytes(done.size)}).`);
      form.reset();
      await refresh();
    } catch (error) {
      sayError(error);
      progressText.textContent = "Upload failed.";
      if (image) {  // a registered image without data is of no use: do not leave it behind
        await api("DELETE", `/v1/images/${image.uuid}`).catch(() => {});
      }
    } finally {
      button.disabled = false;
    }
  });
}

refresh = every(10, load);

// rapbot web chat: one page, no build step. Every action is a chat command sent to
// POST /api/message; its answer streams back as NDJSON events (working, partial, reply).
"use strict";

const token = document.querySelector('meta[name="rapbot-token"]').content;
const $ = (id) => document.getElementById(id);
const messages = $("messages");
let pending = null; // the photo (a File or Blob) the next message carries, used once

function headers() {
  return { "X-Rapbot-Token": token };
}

function scrollDown() {
  messages.scrollTop = messages.scrollHeight;
}

function bubble(kind, text) {
  const li = document.createElement("li");
  li.className = `msg ${kind}`;
  const p = document.createElement("div");
  p.className = "text";
  p.textContent = text;
  li.append(p);
  messages.append(li);
  scrollDown();
  return li;
}

function photoElement(src, className, reusable) {
  const img = document.createElement("img");
  img.src = src;
  img.className = className;
  img.alt = className === "annotated" ? "the photo with named boxes" : "photo";
  if (reusable) {
    img.title = "use this photo with the next message";
    img.addEventListener("click", async () => setPending(await (await fetch(src)).blob()));
  }
  img.addEventListener("load", scrollDown);
  return img;
}

function setPending(file) {
  pending = file;
  $("pending").hidden = !file;
  if (file) {
    $("pending-img").src = URL.createObjectURL(file);
    $("text").focus();
  }
}

function showReply(li, event) {
  li.classList.remove("working");
  li.classList.toggle("error", Boolean(event.error));
  li.querySelector(".text").textContent = event.text;
  if (event.image) {
    li.append(photoElement(event.image, event.image_name === "concepts.jpg" ? "sheet" : "annotated", true));
  }
  if (event.photos && event.photos.length) {
    const grid = document.createElement("div");
    grid.className = "results";
    event.photos.forEach((src, i) => {
      const fig = document.createElement("figure");
      if (src) fig.append(photoElement(src, "result", true));
      const cap = document.createElement("figcaption");
      cap.textContent = src ? `${i + 1}.` : `${i + 1}. (not a photo of this web chat)`;
      fig.append(cap);
      grid.append(fig);
    });
    li.append(grid);
  }
  scrollDown();
}

async function send(text, photo) {
  const mine = bubble("me", text);
  if (photo) mine.append(photoElement(URL.createObjectURL(photo), "posted", true));
  const reply = bubble("bot working", "Working…");
  const form = new FormData();
  form.append("text", text);
  form.append("message_id", crypto.randomUUID());
  if (photo) form.append("photo", photo, photo.name || "photo.jpg");
  $("send").disabled = true;
  try {
    const response = await fetch("/api/message", { method: "POST", body: form, headers: headers() });
    if (!response.ok || !response.body) {
      const body = await response.json().catch(() => ({}));
      showReply(reply, { text: body.error || body.detail || `Error ${response.status}`, error: true });
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffered.slice(0, newline));
        buffered = buffered.slice(newline + 1);
        if (event.event === "working") {
          reply.querySelector(".text").textContent = event.seconds ? `Working… ${event.seconds} s` : "Working…";
        } else if (event.event === "partial") {
          reply.classList.remove("working");
          reply.querySelector(".text").textContent = event.text;
        } else if (event.event === "reply") {
          showReply(reply, event);
        }
      }
    }
  } catch (error) {
    showReply(reply, { text: `The server could not be reached (${error}).`, error: true });
  } finally {
    $("send").disabled = false;
    loadGallery();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text && !pending) return;
  const photo = pending;
  $("text").value = "";
  setPending(null);
  send(text, photo);
});
$("file").addEventListener("change", (e) => { setPending(e.target.files[0] || null); e.target.value = ""; });
$("pending-clear").addEventListener("click", () => setPending(null));
$("help").addEventListener("click", () => send("/help", null));
$("sheet").addEventListener("click", () => send("/concepts", null));

// Paste a photo anywhere, or drop it on the window.
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || { items: [] }).items].find((i) => i.type.startsWith("image/"));
  if (item) { setPending(item.getAsFile()); e.preventDefault(); }
});
let dragDepth = 0;
window.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-hint").hidden = false; });
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-hint").hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop-hint").hidden = true;
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0];
  if (file) setPending(file);
});

// The gallery: every concept with its first crop; its buttons send ordinary commands.
let addingTo = null;
$("add-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (file && addingTo) send(`/remember ${addingTo}`, file);
});

function button(label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", action);
  return b;
}

function card(concept) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.name = concept.name;
  const img = document.createElement("img");
  img.alt = concept.name;
  if (concept.crop) img.src = concept.crop;
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = concept.name;
  const about = document.createElement("div");
  about.className = "about";
  const photos = `${concept.examples} photo${concept.examples === 1 ? "" : "s"}`;
  about.textContent = concept.description ? `${concept.description} · ${photos}` : photos;
  const actions = document.createElement("div");
  actions.className = "actions";
  const examples = document.createElement("div");
  examples.className = "examples";
  actions.append(
    button("rename", () => {
      const to = prompt(`Rename ${concept.name} to:`, concept.name);
      if (to && to.trim() && to.trim() !== concept.name) send(`/rename ${concept.name} | ${to.trim()}`, null);
    }),
    button("describe", () => {
      const about = prompt(`Describe ${concept.name}:`, concept.description);
      if (about !== null) send(`/describe ${concept.name} | ${about.trim()}`, null);
    }),
    button("add photo", () => { addingTo = concept.name; $("add-file").click(); }),
    button("photos", async () => {
      if (examples.childElementCount) { examples.replaceChildren(); return; }
      const response = await fetch(`/api/concepts/${encodeURIComponent(concept.name)}/examples`, { headers: headers() });
      if (!response.ok) return;
      for (const src of (await response.json()).crops) examples.append(photoElement(src, "example", false));
    }),
    button("forget", () => {
      if (confirm(`Forget ${concept.name} and all photos of them?`)) send(`/forget ${concept.name}`, null);
    }),
  );
  li.append(img, name, about, actions, examples);
  return li;
}

async function loadGallery() {
  const response = await fetch("/api/concepts", { headers: headers() });
  if (!response.ok) return;
  const { concepts } = await response.json();
  $("gallery").replaceChildren(...concepts.map(card));
  $("gallery-empty").hidden = concepts.length > 0;
}

(async () => {
  const response = await fetch("/api/session", { headers: headers() });
  if (response.ok) {
    const session = await response.json();
    $("scope").textContent = session.scope;
    bubble("bot", "Hello! Add a photo and type /remember NAME | description, or /help for every command.");
  }
  loadGallery();
})();

// Lyrics: LRC parsing and writing, the per-line view that shows an error on its line, and the timing
// editor (markers on a timeline that can be dragged or moved with the keyboard, and typed times).

const STAMP = /\[(\d+):(\d+(?:\.\d+)?)\]/g;
const SECTION = /^\[([A-Za-z][A-Za-z0-9 _-]*)\]$/;

export function formatTime(seconds) {
  const s = Math.max(0, seconds);
  const m = Math.floor(s / 60);
  const rest = (s - m * 60).toFixed(2).padStart(5, "0");
  return `${String(m).padStart(2, "0")}:${rest}`;
}

// [{time, text}] from LRC text (lines without a timestamp are skipped), sorted by time.
export function parseLrc(text) {
  const out = [];
  for (const raw of (text || "").split(/\r?\n/)) {
    const stamps = [...raw.matchAll(STAMP)];
    if (!stamps.length) continue;
    const body = raw.replace(STAMP, "").trim();
    for (const m of stamps) out.push({ time: Number(m[1]) * 60 + Number(m[2]), text: body });
  }
  return out.sort((a, b) => a.time - b.time);
}

// The user's lyrics as items: section tags and sung lines, each with its 1-based line number.
export function lyricItems(text) {
  return (text || "").split(/\r?\n/).map((raw, i) => {
    const line = raw.trim();
    const section = SECTION.exec(line);
    return { line: i + 1, raw, section: section ? section[1] : null, text: line.replace(STAMP, "").trim() };
  });
}

// The line whose time is the last at or before `t` (seconds), or null.
export function lineAt(lines, t) {
  let found = null;
  for (const l of lines) {
    if (l.time <= t + 1e-6) found = l;
    else break;
  }
  return found;
}

// The lines view under the editor: each line numbered; `error` ({line, message, recovery}) marks one.
export function renderLineView(list, text, error) {
  list.replaceChildren();
  const items = lyricItems(text);
  list.hidden = !error;
  if (!error) return;
  for (const item of items) {
    const li = document.createElement("li");
    li.dataset.line = item.line;
    li.textContent = item.raw || "\u00a0";
    if (item.section) li.classList.add("section-tag");
    if (item.line === error.line) {
      li.classList.add("line-error");
      li.setAttribute("aria-current", "true");
      const note = document.createElement("span");
      note.className = "line-note";
      note.textContent = ` ← ${error.message}`;
      li.append(note);
    }
    list.append(li);
  }
}

// Put the caret on line `n` (1-based) of a textarea and scroll to it.
export function selectLine(textarea, n) {
  const lines = textarea.value.split("\n");
  let start = 0;
  for (let i = 0; i < n - 1 && i < lines.length; i++) start += lines[i].length + 1;
  const end = start + (lines[n - 1] || "").length;
  textarea.focus();
  textarea.setSelectionRange(start, end);
  const lineHeight = textarea.scrollHeight / Math.max(lines.length, 1);
  textarea.scrollTop = Math.max(0, (n - 3) * lineHeight);
}

// LRC text from the timing rows, keeping the user's section tags above the line they introduced.
export function writeLrc(rows, items) {
  const tagsBefore = new Map(); // sung-line index -> tags that came right before it
  let sung = 0;
  let pending = [];
  for (const item of items) {
    if (item.section) pending.push(item.raw.trim());
    else if (item.text) {
      if (pending.length) tagsBefore.set(sung, pending);
      pending = [];
      sung++;
    }
  }
  const out = [];
  rows.forEach((row, i) => {
    for (const tag of tagsBefore.get(i) || []) out.push(tag);
    out.push(`[${formatTime(row.time)}]${row.text}`);
  });
  return out.join("\n");
}

// The timing editor: one marker per line on a timeline of `duration` seconds, and a typed time per row.
// `onChange(rows)` after every move. Returns {rows}.
export function timingEditor(timeline, tbody, rows, duration, onChange) {
  timeline.replaceChildren();
  tbody.replaceChildren();
  const span = Math.max(duration, ...rows.map((r) => r.time + 1), 1);
  const markers = [];
  const inputs = [];

  function place(i) {
    markers[i].style.left = `${(rows[i].time / span) * 100}%`;
    markers[i].setAttribute("aria-valuenow", rows[i].time.toFixed(2));
    markers[i].setAttribute("aria-valuetext", `${formatTime(rows[i].time)}: ${rows[i].text}`);
    inputs[i].value = rows[i].time.toFixed(2);
  }

  function move(i, t) {
    rows[i].time = Math.round(Math.min(Math.max(t, 0), span) * 100) / 100;
    place(i);
    onChange(rows);
  }

  rows.forEach((row, i) => {
    const marker = document.createElement("button");
    marker.type = "button";
    marker.className = "marker";
    marker.setAttribute("role", "slider");
    marker.setAttribute("aria-label", `Start of line ${i + 1}`);
    marker.setAttribute("aria-valuemin", "0");
    marker.setAttribute("aria-valuemax", span.toFixed(2));
    marker.dataset.index = i;
    marker.addEventListener("keydown", (e) => {
      const step = e.shiftKey ? 1 : 0.1;
      if (e.key === "ArrowLeft" || e.key === "ArrowDown") move(i, rows[i].time - step);
      else if (e.key === "ArrowRight" || e.key === "ArrowUp") move(i, rows[i].time + step);
      else return;
      e.preventDefault();
    });
    marker.addEventListener("pointerdown", (e) => {
      marker.setPointerCapture(e.pointerId);
      const box = timeline.getBoundingClientRect();
      const drag = (ev) => move(i, ((ev.clientX - box.left) / box.width) * span);
      const stop = () => {
        marker.removeEventListener("pointermove", drag);
        marker.removeEventListener("pointerup", stop);
      };
      marker.addEventListener("pointermove", drag);
      marker.addEventListener("pointerup", stop);
    });
    timeline.append(marker);
    markers.push(marker);

    const tr = document.createElement("tr");
    const cell = document.createElement("td");
    const input = document.createElement("input");
    input.type = "number";
    input.step = "0.01";
    input.min = "0";
    input.className = "time-input";
    input.setAttribute("aria-label", `Time of line ${i + 1} in seconds`);
    input.addEventListener("change", () => {
      const t = Number(input.value);
      if (Number.isFinite(t)) move(i, t);
    });
    cell.append(input);
    const text = document.createElement("td");
    text.textContent = row.text;
    tr.append(cell, text);
    tbody.append(tr);
    inputs.push(input);
    place(i);
  });
  return { rows };
}

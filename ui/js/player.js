// A take's player: the audio fetched once (with the key) into a blob URL, its waveform drawn on a
// canvas with a time cursor (click or arrow keys to seek), and the lyric line being sung under it.
// The live player plays a take while it is still written: its MP3 bytes, read as they come, fed to a
// MediaSource, the waveform growing as they are decoded; a broken read resumes from its byte offset.

import { audioBlob, liveAudio } from "./api.js";
import { formatTime, lineAt, parseLrc } from "./lyrics.js";

function peaks(buffer, columns) {
  const data = buffer.getChannelData(0);
  const per = Math.max(1, Math.floor(data.length / columns));
  const out = new Float32Array(columns);
  for (let c = 0; c < columns; c++) {
    let max = 0;
    const end = Math.min(data.length, (c + 1) * per);
    for (let i = c * per; i < end; i++) {
      const v = Math.abs(data[i]);
      if (v > max) max = v;
    }
    out[c] = max;
  }
  return out;
}

function draw(canvas, bars, fraction) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const styles = getComputedStyle(canvas);
  ctx.clearRect(0, 0, width, height);
  const played = Math.floor(fraction * bars.length);
  for (let i = 0; i < bars.length; i++) {
    const h = Math.max(1, bars[i] * (height - 4));
    ctx.fillStyle = i < played ? styles.getPropertyValue("--wave-played") : styles.getPropertyValue("--wave");
    ctx.fillRect(i, (height - h) / 2, 1, h);
  }
  ctx.fillStyle = styles.getPropertyValue("--cursor");
  ctx.fillRect(Math.min(width - 2, Math.floor(fraction * width)), 0, 2, height);
}

export async function attachPlayer(root, take, lrc) {
  const audio = root.querySelector("audio");
  const canvas = root.querySelector("canvas");
  const now = root.querySelector(".now-line");
  const lines = parseLrc(lrc);
  const blob = await audioBlob(take.audio_url);
  audio.src = URL.createObjectURL(blob);
  canvas.width = Math.max(200, Math.floor(canvas.clientWidth || 600));
  canvas.setAttribute("aria-label", `Waveform of take ${take.n}, ${formatTime(take.duration_s)} long`);
  canvas.tabIndex = 0;
  let bars = new Float32Array(canvas.width);
  try {
    const ctx = new AudioContext();
    const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
    bars = peaks(decoded, canvas.width);
    ctx.close();
  } catch {
    // a format this browser cannot decode: the player still plays what it can
  }
  const duration = () => (Number.isFinite(audio.duration) && audio.duration > 0 ? audio.duration : take.duration_s);
  const update = () => {
    draw(canvas, bars, audio.currentTime / duration());
    const line = lineAt(lines, audio.currentTime);
    now.textContent = line ? line.text || "\u266a" : "\u00a0";
    root.dataset.time = audio.currentTime.toFixed(2);
  };
  let frame = 0;
  const loop = () => {
    update();
    if (!audio.paused) frame = requestAnimationFrame(loop);
  };
  audio.addEventListener("play", () => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(loop);
  });
  for (const ev of ["pause", "seeked", "timeupdate", "loadedmetadata"]) audio.addEventListener(ev, update);
  canvas.addEventListener("click", (e) => {
    const box = canvas.getBoundingClientRect();
    audio.currentTime = ((e.clientX - box.left) / box.width) * duration();
  });
  canvas.addEventListener("keydown", (e) => {
    const step = e.shiftKey ? 10 : 2;
    if (e.key === "ArrowLeft") audio.currentTime = Math.max(0, audio.currentTime - step);
    else if (e.key === "ArrowRight") audio.currentTime = Math.min(duration(), audio.currentTime + step);
    else if (e.key === " ") audio.paused ? audio.play() : audio.pause();
    else return;
    e.preventDefault();
  });
  update();
  return audio;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Plays `url` (a take's /live route) as it arrives. Returns { audio, done }: `done` resolves with the
// bytes heard once the take has ended (root's data-live-bytes and data-live-sha256 say what they were).
export function attachLivePlayer(root, url, { durationS, lrc, autoplay = true }) {
  const audio = root.querySelector("audio");
  const canvas = root.querySelector("canvas");
  const now = root.querySelector(".now-line");
  const lines = parseLrc(lrc);
  canvas.width = Math.max(200, Math.floor(canvas.clientWidth || 600));
  canvas.setAttribute("aria-label", `Waveform of the live take, ${formatTime(durationS)} long, as it is written`);
  let bars = new Float32Array(canvas.width);
  const chunks = [];
  let received = 0;
  let decoding = false;
  let decodedAt = 0;
  const context = new AudioContext();
  const update = () => {
    draw(canvas, bars, Math.min(1, audio.currentTime / durationS));
    const line = lineAt(lines, audio.currentTime);
    now.textContent = line ? line.text || "\u266a" : "\u00a0";
    root.dataset.time = audio.currentTime.toFixed(2);
  };
  for (const ev of ["timeupdate", "pause", "seeked"]) audio.addEventListener(ev, update);
  // the waveform of what has come so far, decoded again every second and a half (and at the end)
  const redraw = async (force) => {
    if (decoding || (!force && performance.now() - decodedAt < 1500) || !received) return;
    decoding = true;
    try {
      const all = new Uint8Array(received);
      let at = 0;
      for (const c of chunks) {
        all.set(c, at);
        at += c.length;
      }
      const decoded = await context.decodeAudioData(all.buffer);
      const columns = Math.min(canvas.width, Math.round((decoded.duration / durationS) * canvas.width));
      const grown = new Float32Array(canvas.width);
      grown.set(peaks(decoded, columns));
      bars = grown;
      root.dataset.liveSeconds = decoded.duration.toFixed(2);
      update();
    } catch {
      // too little to decode yet
    } finally {
      decoding = false;
      decodedAt = performance.now();
    }
  };
  const source = new MediaSource();
  audio.src = URL.createObjectURL(source);
  const done = (async () => {
    await new Promise((r) => source.addEventListener("sourceopen", r, { once: true }));
    const buffer = source.addSourceBuffer("audio/mpeg");
    const pending = [];
    const appended = () => new Promise((r) => buffer.addEventListener("updateend", r, { once: true }));
    let started = false;
    const feed = async () => {
      while (pending.length) {
        buffer.appendBuffer(pending.shift());
        await appended();
      }
    };
    let feeding = Promise.resolve();
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await liveAudio(url, received);
        if (response.status === 416) break; // a finished take we already have whole
        const reader = response.body.getReader();
        for (;;) {
          const { value, done: end } = await reader.read();
          if (end) break;
          chunks.push(value);
          received += value.length;
          root.dataset.liveBytes = String(received);
          pending.push(value);
          feeding = feeding.then(feed);
          redraw(false);
          if (!started && autoplay) {
            started = true;
            audio.play().catch(() => {
              now.textContent = "Press play to listen while it is written";
            });
          }
        }
        break;
      } catch (err) {
        if (attempt >= 5) throw err;
        await sleep(500 * (attempt + 1)); // the connection broke: resume after the bytes we have
      }
    }
    await feeding;
    if (source.readyState === "open") source.endOfStream();
    await redraw(true);
    if (crypto.subtle) {
      // what was heard, to compare with the stored take (crypto.subtle: secure contexts and localhost only)
      const digest = await crypto.subtle.digest("SHA-256", await new Blob(chunks).arrayBuffer());
      root.dataset.liveSha256 = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    }
    root.dataset.liveDone = "true";
    context.close();
    return received;
  })();
  update();
  return { audio, done };
}

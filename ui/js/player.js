// A take's player: the audio fetched once (with the key) into a blob URL, its waveform drawn on a
// canvas with a time cursor (click or arrow keys to seek), and the lyric line being sung under it.

import { audioBlob } from "./api.js";
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

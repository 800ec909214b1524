// The browser phone's audio thread: microphone -> 20 ms frames of s16le PCM at the phone's
// rate (posted to the page, which sends them on the WebSocket), and the phone's received PCM
// -> the speakers at the audio context's rate. Linear interpolation both ways: enough for
// speech, and no dependency.
"use strict";

class PhoneIo extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.phoneRate = options.processorOptions.phoneRate;
    this.frameSamples = this.phoneRate / 50; // 20 ms
    // Mic: position in the context-rate stream of the next phone-rate sample.
    this.step = sampleRate / this.phoneRate;
    this.pos = 0;
    this.last = 0; // the context-rate sample before the current block
    this.frame = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.sending = false;
    // Speakers: received audio at the context rate, as a queue of Float32Arrays.
    this.queue = [];
    this.queued = 0;
    this.head = 0; // read position in queue[0]
    this.playing = false;
    this.prime = Math.round(sampleRate * 0.06); // start after 60 ms queued
    this.maxQueued = Math.round(sampleRate * 0.5); // drop the oldest beyond 500 ms
    this.upPos = 0;
    this.upLast = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "send") {
      this.sending = msg.on;
      this.filled = 0;
    } else if (msg.type === "play") {
      this.enqueue(new Int16Array(msg.pcm));
    } else if (msg.type === "stop") {
      this.queue = [];
      this.queued = 0;
      this.head = 0;
      this.playing = false;
    }
  }

  // Phone-rate s16 -> context-rate float, appended to the playout queue.
  enqueue(pcm) {
    const ratio = this.phoneRate / sampleRate; // phone samples per context sample
    const out = new Float32Array(Math.ceil(pcm.length / ratio) + 1);
    let n = 0;
    let p = this.upPos;
    while (p < pcm.length) {
      const i = Math.floor(p);
      const frac = p - i;
      const a = i === 0 ? this.upLast : pcm[i - 1] / 32768;
      const b = pcm[i] / 32768;
      out[n++] = a + (b - a) * frac;
      p += ratio;
    }
    this.upPos = p - pcm.length;
    this.upLast = pcm[pcm.length - 1] / 32768;
    this.queue.push(out.subarray(0, n));
    this.queued += n;
    while (this.queued > this.maxQueued && this.queue.length > 1) {
      const dropped = this.queue.shift();
      this.queued -= dropped.length - this.head;
      this.head = 0;
    }
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0][0];
    if (input && this.sending) {
      // Context-rate float -> phone-rate s16, 20 ms at a time.
      let p = this.pos;
      while (p < input.length) {
        const i = Math.floor(p);
        const frac = p - i;
        const a = i === 0 ? this.last : input[i - 1];
        const b = input[i];
        const v = Math.max(-1, Math.min(1, a + (b - a) * frac));
        this.frame[this.filled++] = Math.round(v * 32767);
        if (this.filled === this.frameSamples) {
          const buf = this.frame.buffer.slice(0);
          this.port.postMessage({ type: "frame", pcm: buf }, [buf]);
          this.filled = 0;
        }
        p += this.step;
      }
      this.pos = p - input.length;
      this.last = input[input.length - 1];
    }
    const out = outputs[0][0];
    if (!this.playing && this.queued >= this.prime) this.playing = true;
    let k = 0;
    while (this.playing && k < out.length && this.queue.length > 0) {
      const chunk = this.queue[0];
      const take = Math.min(chunk.length - this.head, out.length - k);
      out.set(chunk.subarray(this.head, this.head + take), k);
      k += take;
      this.head += take;
      this.queued -= take;
      if (this.head === chunk.length) {
        this.queue.shift();
        this.head = 0;
      }
    }
    if (k < out.length) {
      out.fill(0, k);
      if (this.queue.length === 0) this.playing = false; // ran dry: prime again
    }
    return true;
  }
}

registerProcessor("phone-io", PhoneIo);

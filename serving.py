"""Continuous batching for api_server.py: one thread owns the model and decodes every active request together.

How the scheduler works (Engine):

- Requests wait in a queue. Between two decode steps the scheduler admits waiting requests, up to max_batch_size
  active rows: the ones waiting are prefilled together, left-padded to the longest prompt, in one forward straight
  into their own rows of the shared KV cache, and each one's first token is sampled at once (that is the time to
  first token). One forward over many prompts costs little more than over one (it reads the weights once), where
  prefilling them one by one held every running request up for each. A group stops at prefill_tokens padded
  tokens, so a burst of long prompts is admitted over several steps, with decode steps in between.
- The shared cache holds one row per active request, right-aligned: all rows end at the same slot `length`, each
  row's tokens fill its last `cached` slots and the slots before them are left padding, masked out with
  attention_mask. RoPE scores depend only on relative positions, so left padding needs no position shift.
- One batched forward per decode step feeds every row's last sampled token; every row then samples with its own
  repetition_penalty, temperature, top_k, top_p, min_p, banned ids and random stream (a seeded request draws from
  its own generator, so its output does not depend on which other requests share the batch).
- The model puts the key of slot s at RoPE position s. When rows have to move (a new prompt longer than the
  batch's `length` shifts the others right; a full cache, or one that is mostly padding, is compacted to the left)
  their keys are rotated by the shift, which is exact because a RoPE rotation by a+b equals rotations by a then b.
- A finished or cancelled row is freed at once: the last row moves into its place.

The model is not changed for any of this: the engine hands forward() a view of some rows of its cache that looks
like a KVCache (forward uses only `length` and `update`).

Threads: the scheduler thread runs the model with `threads` torch threads, and nothing else in the process should
run torch multi-threaded (api_server loads the model with one). PyTorch's OpenMP (libgomp) keeps a team of worker
threads for every thread that ever ran a parallel region, and once the process holds more of them than there are
cores, the workers stop spinning between parallel regions and sleep: every one of decoding's ~1,000 small ops per
token then waits for a worker to wake up (batch-1 decoding on 2 cores ran at 85 instead of 220 tokens/s).
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("serving.py is a library module, not a script: "
                     "serve a model with api_server.py (see README.md)")
import collections
import dataclasses
import queue
import random
import threading
import traceback

import torch
from torch.nn.attention import sdpa_kernel

from inference import IncrementalDecoder, Reply
from model import DECODE_BACKENDS, KVCache, apply_rope, rope_frequencies, rope_tables
from tools import parse_tool_call
from train_tokenizer import END_TOOL_CALL, TOOL_CALL

# ------------------------------------------------------------------------------------------------- reply text

class StopText:
    """One section of a reply: cut before the first stop string, stripped if asked, and released piece by piece
    only when later text can no longer change it (a tail that may start a stop string, or trailing whitespace that
    strip would remove, waits)."""

    def __init__(self, stop_strings, strip):
        self.stops, self.strip = stop_strings, strip
        self.longest = max((len(s) for s in stop_strings), default=0)
        self.text, self.sent = "", 0
        self.stopped = False

    def feed(self, piece):
        """The text that can be released after appending piece; sets stopped when a stop string appears."""
        if self.strip and not self.text:
            piece = piece.lstrip()
        self.text += piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.finish()
        end = len(self.text) - self._held()
        return self._release(len(self.text[:end].rstrip()) if self.strip else end)

    def finish(self):
        """Everything not yet released (the trailing whitespace dropped when stripping)."""
        return self._release(len(self.text.rstrip()) if self.strip else len(self.text))

    def _held(self):
        """Length of the longest tail of the unreleased text that is the start of some stop string."""
        for n in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def _release(self, end):
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece


class RawReply:
    """Reply's interface for a raw continuation: the text verbatim (special tokens included) as one "text" section,
    ended by a stop id."""

    def __init__(self, tokenizer, stop_ids):
        self.decoder, self.stop_ids = IncrementalDecoder(tokenizer), set(stop_ids)
        self.finish_reason = "length"

    def push(self, token_id):
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        return [("text", self.decoder.push(token_id))]

    def flush(self):
        return [("text", self.decoder.flush())]


class TextOutput:
    """Token ids in, ("reasoning" | "answer" | "text", piece) and ("tool_call", call) out. A chat reply is split by
    inference.Reply into reasoning (inside <think>…</think>), answer and tool calls: each text section stripped like
    split_reasoning strips it, each tool call read by tools.parse_tool_call into {"name", "arguments"} once it is
    complete. A call that does not parse is answer text, tags and all ("<tool_call>…</tool_call>"), so the client
    sees what the model wrote. A raw continuation is one verbatim "text" section. finish_reason becomes "stop" at a
    stop id or a stop string.

    reply_start: the ids at the end of the prompt that already belong to the reply (the generation prompt's <think>,
    the start of a forced tool call), Reply's start: what follows them lands in the right section, and a call's
    text starts with them."""

    def __init__(self, tokenizer, stop_ids, stop_strings, chat, reply_start=()):
        self.reply = Reply(tokenizer, stop_ids, 0, reply_start) if chat else RawReply(tokenizer, stop_ids)
        self.sections = collections.defaultdict(lambda: StopText(stop_strings, strip=chat))
        self.finish_reason = None
        self.end_call = tokenizer.convert_tokens_to_ids(END_TOOL_CALL)

    def push(self, token_id):
        pieces = self._feed(self.reply.push(token_id), closed=token_id == self.end_call)
        if self.reply.finish_reason == "stop":
            self.finish_reason = "stop"
        return pieces

    def close(self):
        """The last pieces once generation ends (at a stop, or at max_tokens with finish_reason "length")."""
        pieces = [] if self.finish_reason else self._feed(self.reply.flush(), closed=False)
        self.finish_reason = self.finish_reason or "length"
        return pieces + [(name, section.finish()) for name, section in self.sections.items()]

    def _feed(self, pieces, closed):
        """Text pieces through their section's StopText; a tool call parsed, or turned into answer text (with its
        closing tag if `closed`: the reply can also end inside a call)."""
        out = []
        for name, text in pieces:
            if name == "tool_call":
                call, _ = parse_tool_call(text)
                if call is not None:
                    out.append(("tool_call", call))
                    continue
                name, text = "answer", TOOL_CALL + text + (END_TOOL_CALL if closed else "")
            section = self.sections[name]
            out.append((name, section.feed(text)))
            if section.stopped:
                self.finish_reason = "stop"
                break
        return out


# ----------------------------------------------------------------------------------------------------- requests

@dataclasses.dataclass(eq=False)  # requests compare by identity
class Request:
    """One generation. sink(events) is called from the scheduler thread with a list of events: (section, text)
    pieces and ("tool_call", call) (TextOutput), then ("finish", finish_reason, completion_tokens) or ("error",
    message) as the last one."""
    prompt_ids: list
    max_tokens: int
    temperature: float
    top_p: float
    rng: random.Random
    output: TextOutput
    sink: object
    top_k: int = 0                  # 0 = off
    min_p: float = 0.0              # 0 = off
    repetition_penalty: float = 1.0
    seen: torch.Tensor = None       # (vocab,) bool: prompt and sampled ids, kept only for a repetition penalty
    banned: tuple = ()              # ids never sampled (tool_choice "none" bans <tool_call>)
    cancelled: bool = False
    generated: int = 0     # tokens sampled so far (the stop token included)
    cached: int = 0        # tokens in this request's cache row
    pending: int = 0       # the last sampled token, fed at the next decode step

    def cancel(self):
        """Free the request's batch row at the next step (or skip it if it is still waiting)."""
        self.cancelled = True


class CacheView:
    """Some rows of the engine's KVCache as model.forward sees a KVCache (it uses only `length` and `update`)."""
    update = KVCache.update

    def __init__(self, cache, rows, length):
        self.keys = [k[rows] for k in cache.keys]
        self.values = [v[rows] for v in cache.values]
        self.length = length


# ------------------------------------------------------------------------------------------------------ engine

class Engine:
    """Owns the model; a background thread admits requests and decodes all active ones in one batch per step."""

    def __init__(self, model, tokenizer, max_batch_size, prefill_tokens=2048, threads=None):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.threads = threads or torch.get_num_threads()  # torch threads of the scheduler thread
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per prefill forward (a longer prompt goes alone)
        self.config = model.config
        weight = next(model.parameters())
        self.device = weight.device
        self.cache = KVCache(self.config, max_batch_size, self.config.max_seq_len, self.device, weight.dtype)
        self.mask = torch.zeros(max_batch_size, self.config.max_seq_len, dtype=torch.bool, device=self.device)
        self.inv_freq = rope_frequencies(self.config)[0].double()
        self.rows = []           # active requests; rows[i] owns cache row i
        self.length = 0          # slots filled in every row (the right end of the right-aligned rows)
        self.waiting = queue.Queue()
        self.held = None         # taken from the queue but left out of a full prefill group: it starts the next one
        self.thread = None
        self.stopping = threading.Event()
        self.failure = None      # why the scheduler thread died, if it did

    # ------------------------------------------------------------------ public, called from the server's threads

    def submit(self, prompt_ids, max_tokens, sink, chat=True, stop_ids=(), stop_strings=(), temperature=1.0,
               top_p=1.0, seed=None, top_k=0, min_p=0.0, repetition_penalty=1.0, banned_ids=(), reply_start=()):
        """Queue a generation; returns its Request (call .cancel() when the client goes away). The caller checks
        that prompt + max_tokens fits in max_seq_len. If the scheduler thread has died, sink gets the error.
        banned_ids are never sampled; reply_start: the ids ending prompt_ids that belong to the reply (TextOutput)."""
        if len(prompt_ids) + max_tokens > self.config.max_seq_len or not prompt_ids or max_tokens < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens={max_tokens} must be at least 1 + 1 "
                             f"and fit in max_seq_len={self.config.max_seq_len}")
        output = TextOutput(self.tokenizer, stop_ids, list(stop_strings), chat, reply_start)
        request = Request(list(prompt_ids), max_tokens, temperature, top_p, random.Random(seed), output, sink,
                          top_k, min_p, repetition_penalty, banned=tuple(banned_ids))
        self.waiting.put(request)
        if self.failure:  # put after the dying thread emptied the queue: nobody else will answer it
            self._fail_waiting()
        return request

    @property
    def cache_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.cache.keys + self.cache.values)

    @property
    def active(self):
        return len(self.rows)

    @property
    def queued(self):
        return self.waiting.qsize() + (self.held is not None)

    @property
    def alive(self):
        """Whether the scheduler thread is running (False before start, after stop, and once it has died)."""
        return self.thread is not None and self.thread.is_alive()

    def start(self):
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.thread.join()
        for request in self.rows + [self.held] * (self.held is not None) + list(self.waiting.queue):
            request.sink([("error", "the server is shutting down")])
        self.rows, self.held = [], None

    # ---------------------------------------------------------------------------------------- the scheduler loop

    def _run(self):
        """The scheduler loop. A failure outside one request's work (_guarded) ends the thread: it is logged,
        kept in self.failure for /health, and every active or waiting request gets it as its error."""
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode(), sdpa_kernel(DECODE_BACKENDS):
                while not self.stopping.is_set():
                    self._admit()
                    self._drop([i for i, r in enumerate(self.rows) if r.cancelled])
                    if self.rows:
                        self._guarded(list(self.rows), self._step)
        except Exception as e:
            traceback.print_exc()
            self.failure = f"{type(e).__name__}: {e}"
            for request in self.rows:
                request.sink([("error", f"the engine stopped: {self.failure}")])
            self.rows = []
            self._fail_waiting()

    def _fail_waiting(self):
        """Answer every waiting request with the failure that ended the scheduler thread."""
        while (request := self._next_waiting(block=False)) is not None:
            request.sink([("error", f"the engine stopped: {self.failure}")])

    def _admit(self):
        """Prefill waiting requests into free rows, as many as fit in one forward of prefill_tokens padded tokens;
        when nothing is active, wait (briefly) for one."""
        group, longest = [], 0
        while len(self.rows) + len(group) < self.max_batch_size:
            request = self._next_waiting(block=not (self.rows or group))
            if request is None:
                break
            if request.cancelled:
                continue
            n = max(longest, len(request.prompt_ids))
            if group and n * (len(group) + 1) > self.prefill_tokens:
                self.held = request
                break
            group.append(request)
            longest = n
        if group:
            self._guarded(group, lambda: self._prefill(group))

    def _next_waiting(self, block):
        """The held request, else the queue's next one (waiting up to 50 ms if block), else None."""
        request, self.held = self.held, None
        if request is not None:
            return request
        try:
            return self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
        except queue.Empty:
            return None

    def _guarded(self, requests, work):
        """Run work(); if it raises, the requests it served get the error (and are dropped), the server goes on."""
        try:
            work()
        except Exception as e:  # reported to every affected client and logged, then the next step runs
            traceback.print_exc()
            for request in requests:
                request.sink([("error", f"generation failed: {type(e).__name__}: {e}")])
            self._drop([i for i, r in enumerate(self.rows) if r in requests])

    def _prefill(self, group):
        """Run the group's prompts, left-padded to the longest, into new rows that end at the batch's right end (one
        forward for all); sample each one's first token."""
        lengths = [len(r.prompt_ids) for r in group]
        longest = max(lengths)
        if not self.rows:
            self.length = 0
        if longest > self.length:
            self._shift(longest - self.length)
        first, start, end = len(self.rows), self.length - longest, self.length
        rows = slice(first, first + len(group))
        ids = torch.zeros(len(group), longest, dtype=torch.long)  # padding: any valid id, masked out
        self.mask[rows] = False
        for i, (request, n) in enumerate(zip(group, lengths)):
            ids[i, longest - n:] = torch.tensor(request.prompt_ids)
            self.mask[first + i, end - n:end] = True
            if request.repetition_penalty != 1.0:
                request.seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
                request.seen[request.prompt_ids] = True
            request.cached = n
        padded = start > 0 or min(lengths) < longest
        attention_mask = self.mask[rows, :end] if padded else None
        view = CacheView(self.cache, rows, start)
        logits = self.model(ids.to(self.device), cache=view, attention_mask=attention_mask, last_only=True).logits
        self.rows.extend(group)
        self._deliver(group, sample(logits[:, -1], group))

    def _step(self):
        """One batched forward: every row's last sampled token in, every row's next token out."""
        padding = self.length - max(r.cached for r in self.rows)
        # A full cache must move left (every row still running has room: prompt + max_tokens fits); one that is
        # mostly padding is compacted too, as attention reads every slot.
        if padding and (self.length == self.config.max_seq_len or padding >= self.length // 2):
            self._shift(-padding)
        B, L = len(self.rows), self.length
        self.mask[:B, L] = True
        padded = any(r.cached < L for r in self.rows)
        attention_mask = self.mask[:B, :L + 1] if padded else None
        tokens = torch.tensor([[r.pending] for r in self.rows], device=self.device)
        view = CacheView(self.cache, slice(0, B), L)
        logits = self.model(tokens, cache=view, attention_mask=attention_mask, last_only=True).logits[:, -1]
        self.length += 1
        for request in self.rows:
            request.cached += 1
        self._deliver(list(self.rows), sample(logits, self.rows))

    def _deliver(self, requests, tokens):
        """Hand each request its new token's text; free the rows that are done."""
        done = []
        for request, token in zip(requests, tokens.tolist()):
            request.generated += 1
            request.pending = token
            if request.seen is not None:
                request.seen[token] = True
            output = request.output
            events = output.push(token)
            if output.finish_reason or request.generated == request.max_tokens:
                events += output.close()
                events.append(("finish", output.finish_reason, request.generated))
                done.append(self.rows.index(request))
            request.sink([e for e in events if e[0] in ("finish", "error") or e[1]])
        self._drop(done)

    # --------------------------------------------------------------------------------------- cache bookkeeping

    def _drop(self, indices):
        """Free rows: the last active row moves into each freed one (highest index first keeps indices valid)."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                for k, v in zip(self.cache.keys, self.cache.values):
                    k[i, :, :self.length] = k[last, :, :self.length]
                    v[i, :, :self.length] = v[last, :, :self.length]
                self.mask[i] = self.mask[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.length = 0

    def _shift(self, d):
        """Move every active row's tokens d slots (right if d > 0, left if d < 0) and rotate its keys by d
        positions, so every key still sits at the RoPE position of its slot."""
        B, L = len(self.rows), self.length
        src = slice(max(-d, 0), L)
        dst = slice(max(-d, 0) + d, L + d)
        cos, signed_sin = rope_tables((d * self.inv_freq).float().to(self.device), 1.0)   # (head_dim,)
        for k, v in zip(self.cache.keys, self.cache.values):
            k[:B, :, dst] = apply_rope(k[:B, :, src].float(), cos, signed_sin).to(k.dtype)
            v[:B, :, dst] = v[:B, :, src].clone()
        self.mask[:B, dst] = self.mask[:B, src].clone()
        if d > 0:
            self.mask[:B, :d] = False
        self.length = L + d


def sample(logits, requests):
    """Next token per row of (B, vocab) logits: greedy for temperature 0 or top_p 0, else a draw from the row's
    distribution() (every row with its own parameters). A row's banned ids are never chosen either way.

    Each sampled row draws one uniform number from its own random.Random and inverts the cumulative
    distribution, so a seeded request's draws do not depend on the other rows."""
    logits = penalise(ban(logits.float(), requests), requests)
    greedy = logits.argmax(dim=-1)
    drawn = [r.temperature > 0 and r.top_p > 0 for r in requests]
    if not any(drawn):
        return greedy
    cdf = distribution(logits, requests).cumsum(dim=-1)
    u = torch.tensor([1.0 - r.rng.random() for r in requests], device=logits.device)  # in (0, 1]
    sampled = (cdf < (u * cdf[:, -1])[:, None]).sum(dim=-1)                            # first cdf >= u·total
    return torch.where(torch.tensor(drawn, device=logits.device), sampled, greedy)


def ban(logits, requests):
    """The logits with each row's banned ids at -inf: out of the argmax and of every sampling distribution."""
    if not any(r.banned for r in requests):
        return logits
    rows = torch.tensor([i for i, r in enumerate(requests) for _ in r.banned], device=logits.device)
    ids = torch.tensor([t for r in requests for t in r.banned], device=logits.device)
    return logits.index_put((rows, ids), torch.tensor(float("-inf"), device=logits.device))


def penalise(logits, requests):
    """model.process_logits's repetition penalty with a per-row penalty: every id a row has seen (its prompt and
    its sampled tokens) is pushed down, a negative logit multiplied, a positive one divided."""
    if all(r.repetition_penalty == 1.0 for r in requests):
        return logits
    unseen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    seen = torch.stack([unseen if r.seen is None else r.seen for r in requests])
    penalty = torch.tensor([r.repetition_penalty for r in requests], device=logits.device)[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def distribution(logits, requests):
    """Unnormalised sampling probabilities of (B, vocab) penalised logits: softmax at each row's temperature, then
    model.process_logits's top-k (ties kept) and top-p rules (top-p over the top-k survivors; the most likely token
    stays, as top_p > 0), then min_p as transformers has it (drop tokens below min_p times the top probability).
    Rows that sample greedily get a temperature-1 distribution that sample() ignores."""
    device = logits.device
    temperature = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in requests], device=device)
    probs = (logits / temperature[:, None]).softmax(dim=-1)
    if any(r.top_k > 0 or r.top_p < 1.0 for r in requests):  # sorting the vocabulary is the costly part
        probs = truncate_sorted(probs, requests)
    if any(r.min_p > 0 for r in requests):
        min_p = torch.tensor([r.min_p for r in requests], device=device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def truncate_sorted(probs, requests):
    """probs with each row's top-k and top-p cuts applied (0 = no top-k; top_p 1 = no top-p)."""
    vocab, device = probs.shape[-1], probs.device
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    k = torch.tensor([min(r.top_k, vocab) if r.top_k > 0 else vocab for r in requests], device=device)
    kth = sorted_probs.gather(1, (k - 1)[:, None])
    sorted_probs = sorted_probs.masked_fill(sorted_probs < kth, 0.0)
    # Drop a token when the more likely ones already reach top_p of what top-k kept (inf: never, for top_p 1).
    top_p = torch.tensor([r.top_p if r.top_p < 1.0 else float("inf") for r in requests], device=device)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop = cumulative - sorted_probs >= top_p[:, None] * cumulative[:, -1:]
    return torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(drop, 0.0))

"""Stream-T1 search over chunks: candidates of all beams denoise as one batch against the shared cache.

One ``step`` per chunk: fork B children per beam (B*K for the first chunk), draw their noise (propagated
from the parent's), denoise all of them together, decode each once from its parent's VAE state, score
short- and long-term rewards, keep the top K, run the clean context pass for the survivors only, route
their pages for memory sinking, and release everything the pruned candidates referenced at once.
With ``reward_frames="cold"`` the rewards see what the reference shows them: the chunk decoded alone and
the window decoded from its first chunk, both from a cold VAE state (siblings share their beam's decoded
window prefix); the output video stays the streamed decode.
``none`` and ``best_of_n`` are the same loop with other shapes and units switched off.
Between two steps ``switch_prompt`` continues the stream with another prompt (LongLive's recache).
The decisions (seeds, survivors, route flags, hybrid weight, final pick) come from ``policy.SearchPolicy``
on host values; this module does the tensor work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..cache import BeamPages, PagedKVCache, RouteFlag
from ..config import StreamConfig
from ..errors import StreamT1Error, require
from ..rewards.base import score
from ..model.wan import ChunkAttention, TextContext
from ..sampler import ChunkNoise, EagerDenoiser, Schedule, context_pass  # EagerDenoiser: also imported from here
from ..vae import decode_cold_windows
from .config import SearchConfig
from .executor import ContextWork, DenoiseWork
from .noise import StreamNoise, draw_chunk_noise, draw_upstream_noise, fuse_upstream_noise, propagate_noise
from .policy import SearchPolicy


@dataclass
class ChunkNode:
    """One generated chunk; beams that descend from it share the node (and its cache page)."""

    index: int
    seed: int
    parent: "ChunkNode | None"
    latents: torch.Tensor  # [C, F, h, w] float32; the last window_chunks - 1 of a beam feed its cold window decode
    frames: torch.Tensor  # [T, H, W, 3] uint8, device
    initial_noise: torch.Tensor | None  # [C, F, h, w], what noise propagation hands to children; dropped
    # (None) once the node is no longer a beam's last chunk, since only a beam's last noise is propagated
    short: float | None = None
    long: float | None = None
    hybrid: float | None = None
    flag: RouteFlag = RouteFlag.DISCARD
    emitted: bool = False  # handed to the caller as a final chunk
    offloaded: bool = False  # out of every window: frames on the host, latents on the host or dropped

    def lineage(self, last: int | None = None) -> list["ChunkNode"]:
        """The chunks from the first to this one; ``last``: only the last ``last`` of them (a walk of that many
        nodes, not of the whole stream)."""
        nodes, node = [], self
        while node is not None and (last is None or len(nodes) < last):
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class Beam:
    node: ChunkNode | None
    pages: BeamPages
    short_history: list[float] = field(default_factory=list)
    last_long: float | None = None


@dataclass
class ChunkRecord:
    """What happened at one chunk: enough to audit the search afterwards (also written to JSON)."""

    index: int
    candidate_seeds: list[int]
    candidate_parents: list[int]
    short_scores: list[float] | None
    long_scores: list[float] | None
    hybrid_scores: list[float] | None
    hybrid_weight: float | None
    survivors: list[int]
    route_flags: list[str]
    sink_frames: list[int]
    window_frames: list[int]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PromptSwitch:
    """A prompt switch that took effect at chunk ``chunk`` (every chunk from it on uses ``prompt``)."""

    chunk: int
    prompt: str
    recached_chunks: list[int]  # chunks whose K/V were recomputed with the new prompt (none before chunk 0)
    pages_written: int  # one per recached chunk and beam

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def recache_span(stream: StreamConfig) -> int:
    """Chunks LongLive recomputes at a prompt switch: its whole attention span, ``local_attn_size`` frames
    (sink and the current chunk's slot included), or every chunk so far under global attention."""
    if stream.is_global:
        return stream.window_pages + 1
    return stream.local_attn_size // stream.chunk_frames


def to_uint8(frames: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """float [N, T, 3, H, W] in [0, 1] -> uint8 [N, T, H, W, 3]; ``truncate`` as the reference's PNG / MP4
    writers do (``(255 * x).astype(uint8)``), otherwise rounded."""
    scaled = frames.clamp(0, 1) * 255
    return (scaled if truncate else scaled.round()).to(torch.uint8).permute(0, 1, 3, 4, 2)


def to_float(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., T, H, W, 3] -> float [..., T, 3, H, W] in [0, 1]."""
    return frames_u8.movedim(-1, -3).float() / 255.0


RewardFn = Callable[[torch.Tensor, str], torch.Tensor]


class BeamSearch:
    """Runs one prompt's stream; ``step()`` generates one chunk for every beam."""

    def __init__(self, *, model, vae, cache: PagedKVCache, text: TextContext, prompt: str, search: SearchConfig,
                 schedule: Schedule, num_chunks: int, seed: int, latent_shape: tuple[int, int, int, int],
                 short_reward: RewardFn | None, long_reward: RewardFn | None, attention_backend: str,
                 context_timestep: float = 0.0, hooks=None, denoiser=None):
        self.model, self.vae, self.cache, self.text = model, vae, cache, text
        self.denoiser = denoiser or EagerDenoiser(model, schedule, text, context_timestep)
        self.prompt, self.search, self.schedule = prompt, search, schedule
        self.num_chunks, self.seed = num_chunks, seed
        self.latent_shape = latent_shape  # (C, F, h, w) of one chunk
        self.short_reward, self.long_reward = short_reward, long_reward
        self.backend = attention_backend
        self.context_timestep = context_timestep
        self.hooks = hooks
        self.device = cache.pool.k.device
        self.beams = [Beam(None, BeamPages())]
        self.vae_state: Any = None  # batched over beams, in beam order
        self.records: list[ChunkRecord] = []
        self.chunk_index = 0
        self.noise_dtype = cache.pool.k.dtype  # upstream draws in the dtype its model and KV cache run in
        self.policy = SearchPolicy(search, seed, num_chunks, latent_shape[1])
        self._stream_noise: StreamNoise | None = None  # plain streaming in official mode: one generator
        self.initial_prompt = prompt
        self.prompt_switches: list[PromptSwitch] = []
        self.recache_chunks = recache_span(cache.stream)  # latents kept (on the host) for a prompt switch
        if search.uses_rewards and (short_reward is None or long_reward is None):
            raise StreamT1Error(f"search {search.strategy!r} needs a short-term and a long-term reward")

    # -- candidate construction -------------------------------------------------------------------
    def _noise(self, seeds: list[int], parents: list[int]) -> ChunkNoise:
        """All of the chunk's noise, drawn before denoising (graph replays need it pre-drawn)."""
        official = self.search.noise_mode == "official"
        if official and self.search.strategy == "none":
            if self._stream_noise is None:
                self._stream_noise = StreamNoise(self.seed, self.num_chunks, self.latent_shape,
                                                 self.schedule.num_steps, self.device, self.noise_dtype)
            return self._stream_noise.draw(self.chunk_index)
        if official:
            noise = draw_upstream_noise(seeds, self.latent_shape, self.schedule.num_steps, self.device,
                                        self.noise_dtype)
        else:
            noise = draw_chunk_noise(seeds, self.chunk_index, self.latent_shape, self.schedule.num_steps,
                                     self.device)
        if self.search.propagates_noise and self.chunk_index > 0:
            parent_noise = torch.stack([self.beams[p].node.initial_noise for p in parents])
            fuse = fuse_upstream_noise if official else propagate_noise
            noise.initial = fuse(parent_noise, noise.initial, self.search.noise_sigma)
        return noise

    def _attention(self, parent_beams: list[Beam], write_pages=None) -> ChunkAttention:
        table, counts = self.cache.page_table([b.pages for b in parent_beams])
        start = torch.full((len(parent_beams),), self.chunk_index * self.latent_shape[1], dtype=torch.long,
                           device=self.device)
        rows = tuple(len(b.pages.all_pages()) for b in parent_beams)
        return ChunkAttention(self.cache.pool, table, counts, start, write_pages, backend=self.backend,
                              max_pages=max(rows, default=0), row_pages=rows)

    def _range(self, name: str):
        return self.hooks.range(name) if self.hooks is not None else _nullcontext()

    # -- scoring and selection --------------------------------------------------------------------
    def _window_video(self, parent_beams: list[Beam], frames_u8: torch.Tensor) -> torch.Tensor:
        """Each candidate's last ``window_chunks`` chunks as one clip, reusing the streamed parent frames."""
        clips = []
        for beam, own in zip(parent_beams, frames_u8):
            history = beam.node.lineage(self.search.window_chunks - 1) if (
                beam.node is not None and self.search.window_chunks > 1) else []
            clips.append(torch.cat([n.frames for n in history] + [own], dim=0))
        return to_float(torch.stack(clips))

    def _reward_inputs(self, parent_beams: list[Beam], parents: list[int], x0: torch.Tensor,
                       frames_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float frames for the short- and the long-term reward. Cold decodes are needed only for a VAE with a
        decoder state, after chunk 0; otherwise the streamed decode is a cold one."""
        if self.search.reward_frames == "streamed" or self.vae_state is None:
            return to_float(frames_u8), self._window_video(parent_beams, frames_u8)
        w = self.search.window_chunks
        short_u8 = to_uint8(self.vae.decode_chunk(x0, None)[0], truncate=True)
        if w == 1:
            return to_float(short_u8), to_float(short_u8)
        if self.chunk_index < w:  # the window starts at frame 0: its cold decode is the streamed one
            return to_float(short_u8), self._window_video(parent_beams, frames_u8)
        prefixes = torch.stack([torch.cat([n.latents.to(self.device) for n in beam.node.lineage(w - 1)],
                                          dim=1) for beam in self.beams])
        window = decode_cold_windows(self.vae, prefixes, x0, torch.tensor(parents, device=self.device))
        return to_float(short_u8), to_float(to_uint8(window, truncate=True))

    # -- one chunk --------------------------------------------------------------------------------
    def step(self) -> ChunkRecord:
        """One chunk, its DiT work run by this search's own denoiser."""
        phases = self.phases()
        try:
            work = next(phases)
            while True:
                work = phases.send(self.run_work(work))
        except StopIteration as done:
            return done.value

    def run_work(self, work: DenoiseWork | ContextWork):
        if isinstance(work, DenoiseWork):
            with self._range("denoise"):
                return self.denoiser.denoise(work.noise, work.attn, work.text)
        with self._range("context_pass"):
            self.denoiser.context(work.x0, work.attn, work.text)
        return None

    def phases(self):
        """One chunk as a generator: yields the denoise work (receives x0), then the context pass work (receives
        None), and returns the chunk's record; the host, VAE and reward work run in between. A driver may run
        the yielded DiT work of several streams as one batch (``executor.run_batched``)."""
        search, c = self.search, self.chunk_index
        seeds, parents = self.policy.candidates(c, [beam.node.seed for beam in self.beams] if c > 0 else [])
        parent_beams = [self.beams[p] for p in parents]
        n = len(seeds)
        noise = self._noise(seeds, parents)
        x0 = yield DenoiseWork(noise, self._attention(parent_beams), self.text)
        with self._range("vae_decode"):
            state = None
            if self.vae_state is not None:
                state = self.vae.select_state(self.vae_state, torch.tensor(parents, device=self.device))
            frames, new_state = self.vae.decode_chunk(x0, state)
        frames_u8 = to_uint8(frames, truncate=search.reward_frames == "cold")

        short = long = hybrid = None
        weight = None
        if search.uses_rewards:
            with self._range("rewards"):
                short_in, long_in = self._reward_inputs(parent_beams, parents, x0, frames_u8)
                short = score(self.short_reward, short_in, self.prompt)
                long = score(self.long_reward, long_in, self.prompt)
                weight = self.policy.hybrid_weight(c)
                hybrid = weight * short + (1 - weight) * long
            # a candidate with non-finite latents gets a NaN score: seen with the scores' own read-back below
            hybrid = torch.where(torch.isfinite(x0).flatten(1).all(1), hybrid, torch.nan)
        short_l = short.tolist() if short is not None else None
        long_l = long.tolist() if long is not None else None
        hybrid_l = hybrid.tolist() if hybrid is not None else None
        if hybrid_l is not None and not all(math.isfinite(v) for v in hybrid_l):
            bad = [i for i, v in enumerate(hybrid_l) if not math.isfinite(v)]
            raise StreamT1Error(f"chunk {c}: candidates {bad} have non-finite latents or reward scores (NaN or "
                                "infinity): the model's weights or inputs are corrupt, or the dtype overflows")
        survivors = self.policy.select(hybrid_l, n)

        # clean context pass for the survivors only, writing one fresh page each
        surv_parents = [parent_beams[i] for i in survivors]
        idx = torch.tensor(survivors, device=self.device)
        write = self.cache.new_chunk_pages(len(survivors), c * self.latent_shape[1])
        yield ContextWork(x0[idx], self._attention(surv_parents, write), self.text)

        with self._range("routing"):
            new_beams = []
            for slot, i in enumerate(survivors):
                parent = parent_beams[i]
                s_i = short_l[i] if short_l is not None else None
                l_i = long_l[i] if long_l is not None else None
                flag = self.policy.route(c, parent.short_history, parent.last_long, s_i, l_i)
                # clones: a slice would keep the whole candidate batch alive for as long as the node lives
                node = ChunkNode(c, seeds[i], parent.node, x0[i].clone(), frames_u8[i].clone(),
                                 noise.initial[i].clone(), s_i, l_i, hybrid_l[i] if hybrid_l is not None else None,
                                 flag)
                pages = self.cache.fork(parent.pages)
                history = parent.short_history + ([s_i] if s_i is not None else [])
                new_beams.append((Beam(node, pages, history, l_i), int(write[slot])))
            for beam in self.beams:
                self.cache.drop(beam.pages)
            self.vae_state = self.vae.select_state(new_state, idx) if new_state is not None else None
            self.beams = []
            for beam, page in new_beams:
                self.cache.commit(beam.pages, page, beam.node.flag)
                self.beams.append(beam)
            self.cache.flush(search.ema_alpha)
            self._offload_history()

        chunk_frames = self.latent_shape[1]
        record = ChunkRecord(
            index=c, candidate_seeds=seeds, candidate_parents=parents if c > 0 else [-1] * n,
            short_scores=short_l, long_scores=long_l, hybrid_scores=hybrid_l, hybrid_weight=weight,
            survivors=survivors, route_flags=[b.node.flag.name for b in self.beams],
            sink_frames=[len(b.pages.sink) * chunk_frames for b in self.beams],
            window_frames=[len(b.pages.window) * chunk_frames for b in self.beams])
        self.records.append(record)
        self.chunk_index += 1
        return record

    def _offload_history(self) -> None:
        """Keep on the device only what the next chunks read: the initial noise of each beam's last node
        (children propagate their parent beam's last noise) and the frames and latents of the last
        ``window_chunks`` chunks (the long-term reward's window); older frames and latents are only needed for
        the output and move to the host, so device memory stays flat however long the stream runs. Latents of
        the last ``recache_chunks`` chunks stay (on the host) after they are emitted, for a prompt switch."""
        keep = max(self.search.window_chunks, 1)
        for beam in self.beams:
            node, depth = beam.node.parent, 1
            while node is not None:  # back to the first node already offloaded and out of the recache span
                node.initial_noise = None
                if depth >= keep:
                    if node.offloaded and depth > self.recache_chunks:
                        break
                    if not node.offloaded:
                        node.frames = node.frames.cpu()
                        node.latents = node.latents.cpu() if node.latents is not None else None
                        node.offloaded = True
                    if node.emitted and depth >= self.recache_chunks:  # a prompt switch no longer reads them
                        node.latents = None
                node, depth = node.parent, depth + 1

    def mark_emitted(self, node: ChunkNode) -> None:
        """The caller has this final chunk: once out of the window and the recache span its latents are not
        needed here (its frames are, for the final pick over whole videos)."""
        node.emitted = True
        if node.offloaded and node.index < self.chunk_index - self.recache_chunks:
            node.latents = None

    # -- prompt switching -------------------------------------------------------------------------
    def switch_prompt(self, prompt: str, text: TextContext, *, keep_sink: bool = False) -> PromptSwitch:
        """Make the next chunk and all after it with ``prompt`` (``text``: its cross-attention K/V), as
        LongLive's interactive mode switches (``_recache_after_switch``): the cache is rebuilt from the clean
        latents of the last ``recache_span`` chunks, run in one context pass with the new prompt at their own
        frame positions and the context timestep, every frame attending to all of them (the pass has no causal
        mask); their K/V replace the beam's pages. The first ``sink_size`` frames of the span become the sink
        and the last ``window_pages`` chunks the window; the chunk in between (the current chunk's slot in
        LongLive's cache) is recomputed but evicted, as LongLive's next forward evicts it. An EMA-merged or
        APPEND-grown sink is thus replaced by a plain recomputed chunk, as LongLive (default
        ``global_sink=False``) replaces its sink.

        ``keep_sink``: LongLive's ``global_sink=True``: once the span starts after frame 0, the sink pages stay
        as they are (made with the old prompt, merges included) and the span's chunks after its first
        ``sink_size`` frames are recomputed attending to that sink and to each other; earlier it is the default.

        Every beam gets its own new pages, also for chunks its old pages shared with other beams: every
        recomputed frame attends to the later ones, and a beam's last chunk is its own. The rewards and the
        final pick score against the new prompt from now on."""
        require(isinstance(prompt, str) and prompt.strip() != "", "a prompt switch needs a non-empty prompt")
        c = self.chunk_index
        require(c < self.num_chunks, f"all {self.num_chunks} chunks are made: there is no chunk left to switch")
        chunks, written = self._recache(text, keep_sink) if c > 0 else ([], 0)
        self.prompt, self.text = prompt, text
        self.denoiser.set_text(text)
        switch = PromptSwitch(c, prompt, chunks, written)
        self.prompt_switches.append(switch)
        return switch

    def prompt_of(self, chunk: int) -> str:
        """The prompt chunk ``chunk`` was (or will be) made with."""
        prompt = self.initial_prompt
        for switch in self.prompt_switches:
            if switch.chunk <= chunk:
                prompt = switch.prompt
        return prompt

    def _recache(self, text: TextContext, keep_sink: bool) -> tuple[list[int], int]:
        stream, cf = self.cache.stream, self.latent_shape[1]
        span = min(self.chunk_index, self.recache_chunks)
        first = self.chunk_index - span
        num_sink = min(stream.sink_pages, span)
        # LongLive protects its sink only in a recompute that starts after frame 0 (``is_recompute``); then the
        # span's first sink_size frames are neither written nor read, so they need not be computed at all
        keep_sink = keep_sink and first > 0
        if keep_sink:
            first, span, num_sink = first + num_sink, span - num_sink, 0
        tails = [beam.node.lineage(span) for beam in self.beams]
        missing = sorted({n.index for nodes in tails for n in nodes if n.latents is None})
        require(not missing, f"cannot recache chunks {missing} for a prompt switch: their latents were dropped")
        # the old window is never read again (LongLive overwrites it; by default it zeroes its whole cache first)
        sinks = [BeamPages(beam.pages.sink if keep_sink else []) for beam in self.beams]
        for beam in self.beams:
            for page in beam.pages.window + ([] if keep_sink else beam.pages.sink):
                self.cache.release(page)
        pages = torch.stack([self.cache.new_chunk_pages(len(tails), (first + j) * cf) for j in range(span)], dim=1)
        start = torch.full((1,), first * cf, dtype=torch.long, device=self.device)
        # one beam per pass: its queries span ``span`` chunks, so the peak stays that of ``span`` candidates
        with self._range("recache"), torch.inference_mode():
            for i, (nodes, sink) in enumerate(zip(tails, sinks)):
                x0 = torch.cat([n.latents.to(self.device) for n in nodes], dim=1)[None]
                table, counts = self.cache.page_table([sink])
                attn = ChunkAttention(self.cache.pool, table, counts, start, pages[i:i + 1], backend=self.backend,
                                      max_pages=len(sink.sink))
                context_pass(self.model, x0, text, attn, self.context_timestep)
        for beam, nodes, row, sink in zip(self.beams, tails, pages.tolist(), sinks):
            for node, page in zip(nodes, row):
                self.cache.flag[page] = node.flag  # a window page's flag routes it when it is evicted
            rest = row[num_sink:]
            kept = len(rest) if stream.is_global else min(len(rest), stream.window_pages)
            beam.pages = BeamPages(sink.sink if keep_sink else row[:num_sink], rest[len(rest) - kept:])
            for page in rest[:len(rest) - kept]:
                self.cache.release(page)
        return list(range(first, self.chunk_index)), len(tails) * span

    # -- results ----------------------------------------------------------------------------------
    def final_chunks(self) -> list[ChunkNode]:
        """Chunks every beam agrees on (the common prefix of all lineages): safe to stream out."""
        lineages = [b.node.lineage() for b in self.beams]
        common = []
        for nodes in zip(*lineages):
            if all(n is nodes[0] for n in nodes):
                common.append(nodes[0])
            else:
                break
        return common

    def choose_final(self, final_reward: RewardFn | None) -> tuple[int, list[float] | None]:
        """Score each beam's whole video. The reference decodes it from frame 0, which gives the streamed
        frames (quantised as the mode quantises them: truncated when ``reward_frames="cold"``)."""
        if len(self.beams) == 1 or final_reward is None:
            return 0, None
        videos = torch.stack([to_float(torch.cat([n.frames.to(self.device) for n in b.node.lineage()]))
                              for b in self.beams])
        scores = score(final_reward, videos, self.prompt).tolist()
        return self.policy.final_pick(scores), scores

    def release(self) -> None:
        """Return every page this stream references (also the pages of a chunk step that failed midway)."""
        self.cache.release_all()
        for beam in self.beams:
            beam.pages.sink.clear()
            beam.pages.window.clear()
        self.beams = []


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

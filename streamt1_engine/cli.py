"""Command line: ``streamt1 generate "prompt" -o out.mp4`` writes the video and a JSON record beside it."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from .config import STREAM_PRESETS
from .engine import ATTENTION_BACKENDS
from .errors import StreamT1Error
from .presets import RUN_PRESETS
from .flags import add_config_flags, config_from_args, field_flags, flag_defaults
from .search.config import SearchConfig

log = logging.getLogger("streamt1")
MAX_DEFAULT_THREADS = 8


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def default_threads() -> int:
    """CPUs this process may use, less the ones other processes keep busy (1-minute load average), in
    [1, 8]: on a loaded CPU, more compute threads than idle cores make torch's kernels wait on each other."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0])
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(cpus - busy, cpus, MAX_DEFAULT_THREADS))


def _search_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SearchConfig field, generated from the dataclass (help and choices in its field metadata)."""
    g = parser.add_argument_group("search (defaults: the Stream-T1 paper's)")
    add_config_flags(g, SearchConfig)
    g.add_argument("--short-reward", default=None, help="short-term reward name (see docs)")
    g.add_argument("--long-reward", default=None, help="long-term reward name")
    g.add_argument("--final-reward", default=None, help="reward that picks the final beam (default: long)")


def build_parser(generate_defaults: dict | None = None) -> argparse.ArgumentParser:
    """``generate_defaults`` replace the built-in defaults of ``generate`` (from an upstream ``--config``)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="streamt1", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streamt1-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument("prompt", nargs="?", default=None,
                     help="the prompt (may be left out when --prompt-schedule gives the chunk-0 prompt)")
    gen.add_argument("-o", "--output", default="out.mp4", help="mp4 path; the JSON record goes beside it")
    gen.add_argument("--model", default="tiny",
                     help="tiny (embedded, default), random-tiny, an engine/diffusers directory, a checkpoint or hub id")
    gen.add_argument("--text-encoder", default=None, help="umT5 source for a bare DiT checkpoint")
    gen.add_argument("--vae", default=None, help="Wan VAE source for a bare DiT checkpoint")
    gen.add_argument("--lora", default=None, help="LoRA file merged at load (LongLive)")
    gen.add_argument("--lora-alpha", type=float, default=None,
                     help="alpha the LoRA was trained with (its config's adapter alpha); scale = alpha / rank; "
                          "default: the file's alpha, else the rank")
    gen.add_argument("--preset", choices=sorted(RUN_PRESETS), default=None,
                     help="a published setup as defaults (stream-t1-paper: the paper's model, search and rewards); "
                          "flags given here win")
    gen.add_argument("--config", default=None, metavar="UPSTREAM.yaml",
                     help="upstream inference YAML (e.g. Stream-T1's stream_scaling.yaml); flags given here win")
    gen.add_argument("--stream-preset", choices=sorted(STREAM_PRESETS), default=None,
                     help="attention layout (default: from the checkpoint format; self-forcing/causvid: global "
                          "over 21 frames, longlive: local 12 incl. sink 3, stream-t1: longlive + sink up to 15)")
    gen.add_argument("--chunks", type=int, default=7, help="number of chunks (3 latent frames each)")
    gen.add_argument("--prompt-schedule", default=None, metavar="FILE",
                     help="prompt switches mid-stream (LongLive's recache): a JSON {chunk: prompt} file or a LongLive "
                          "JSONL file ({\"prompts\": [...], \"switch_frame_indices\": [...]} per line)")
    gen.add_argument("--prompt-schedule-line", type=int, default=0, metavar="N",
                     help="which line of a JSONL --prompt-schedule to use (from 0)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    gen.add_argument("--attention-backend", default="auto",
                     choices=ATTENTION_BACKENDS)
    gen.add_argument("--height", type=int, default=None, help="frame height in pixels (model default)")
    gen.add_argument("--width", type=int, default=None, help="frame width in pixels (model default)")
    gen.add_argument("--fps", type=positive_int, default=None, help="video frame rate (model default)")
    gen.add_argument("--threads", type=positive_int, default=None,
                     help="CPU compute threads (torch.set_num_threads); default: the CPUs this process may use "
                          "less the 1-minute load average, between 1 and 8")
    gen.add_argument("--memory-limit", default="auto",
                     help="memory a run may take besides the weights, e.g. 16G or 512M; auto (default): what the "
                          "device has free; none: no check")
    gen.add_argument("--cuda-graphs", action="store_true", help="replay each chunk from CUDA graphs (CUDA only)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("-v", "--verbose", action="store_true", help="log every chunk's search decisions")
    _search_flags(gen)
    if generate_defaults:
        gen.set_defaults(**generate_defaults)
    from .serving.command import add_serve_parser

    add_serve_parser(sub)
    inspect = sub.add_parser("inspect", help="say whether the run behind a video or run record finished")
    inspect.add_argument("path", help="the video (out.mp4) or its run record (out.json)")
    return parser


def search_config(args) -> SearchConfig:
    return config_from_args(SearchConfig, args)


def upstream_defaults(path: str) -> dict:
    """The ``generate`` defaults an upstream YAML implies (explicit flags still win)."""
    from .upstream_config import load_upstream_config

    cfg = load_upstream_config(path)
    defaults = dict(upstream=cfg, chunks=cfg.num_chunks, seed=cfg.seed, **flag_defaults(SearchConfig, cfg.search))
    if cfg.checkpoint is not None:
        defaults["model"] = cfg.checkpoint
    if cfg.lora is not None:
        defaults.update(lora=cfg.lora, lora_alpha=cfg.lora_alpha)
    return defaults


def stream_options(args) -> dict:
    """The from_pretrained arguments for the stream layout and sampler: --stream-preset, else the upstream
    --config's layout and schedule, else the model's own."""
    options = {"stream_preset": args.stream_preset}
    upstream = getattr(args, "upstream", None)
    if upstream is not None:
        options["sampler"] = upstream.sampler
        if args.stream_preset is None:
            options["stream"] = upstream.stream
    return options


def _log_record(record) -> None:
    def fmt(xs):
        return "-" if xs is None else "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"

    log.info("chunk %d: seeds %s short %s long %s hybrid %s -> survivors %s, routes %s, sink frames %s",
             record.index, record.candidate_seeds, fmt(record.short_scores), fmt(record.long_scores),
             fmt(record.hybrid_scores), record.survivors, record.route_flags, record.sink_frames)


def check_output(output: Path) -> Path:
    """Before any work: an .mp4 path that is not a directory, in an existing folder we can write to."""
    if output.suffix.lower() != ".mp4":
        raise StreamT1Error(f"output must end in .mp4, got {output}")
    record = output.with_suffix(".json")
    for path in (output, record):
        if path.is_dir():
            raise StreamT1Error(f"output {path} is a directory")
    folder = output.parent
    if not folder.exists():
        raise StreamT1Error(f"output directory {folder} does not exist")
    try:  # a probe file, since permission bits do not tell about read-only mounts
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StreamT1Error(f"cannot write to output directory {folder}: {exc.strerror or exc}") from None
    return record


def check_room(folder: Path, frames: int, height: int, width: int) -> None:
    """Room for the video before generating it: a quarter of the raw frames, plus a margin for the record."""
    need = frames * height * width * 3 // 4 + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise StreamT1Error(f"not enough free space in {folder} for the video: about {need / 2**20:.1f} MiB "
                            f"needed, {free / 2**20:.1f} MiB free")


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """SIGINT/SIGTERM stop the run with ``Interrupted``, but never in the middle of writing the output: a
    signal that arrives while ``writing()`` is raised right after the write."""

    def __init__(self):
        self.pending: int | None = None
        self.depth = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        self.pending = signum
        if self.depth == 0:
            raise Interrupted(signum)

    @contextmanager
    def writing(self, check: bool = True):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if check and self.pending is not None and self.depth == 0:
            raise Interrupted(self.pending)


def generate(args) -> int:
    from tqdm import tqdm

    from .engine import StreamT1Engine, require_text
    from .memory import parse_size
    from .run_record import writer_fields
    from .video_io import Mp4StreamWriter, write_json

    output = Path(args.output)
    record_path = check_output(output)
    if args.prompt is None and args.prompt_schedule is None:
        raise StreamT1Error("prompt is empty (give a prompt, or a --prompt-schedule with a chunk-0 prompt)")
    if args.prompt is not None:
        require_text(args.prompt, "prompt")
    search = search_config(args)
    _warn_ignored(args, search)
    schedule_spec = None
    if args.prompt_schedule is not None:  # read before the model loads: a missing file or line fails first
        from .prompt_schedule import read_prompt_schedule

        schedule_spec = read_prompt_schedule(args.prompt_schedule, args.prompt_schedule_line)
    import torch

    torch.set_num_threads(args.threads or default_threads())
    memory_limit = parse_size(args.memory_limit) if args.memory_limit != "auto" else "auto"
    engine = StreamT1Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                            attention_backend=args.attention_backend, text_encoder=args.text_encoder,
                                            vae=args.vae, lora=args.lora, lora_alpha=args.lora_alpha,
                                            cuda_graphs=args.cuda_graphs, memory_limit=memory_limit,
                                            **stream_options(args))
    fps = args.fps if args.fps is not None else engine.fps
    schedule = None
    if schedule_spec is not None:
        from .prompt_schedule import parse_prompt_schedule, split_schedule

        try:
            schedule = parse_prompt_schedule(schedule_spec, num_chunks=args.chunks,
                                             chunk_frames=engine.config.stream.chunk_frames)
        except StreamT1Error as exc:
            raise StreamT1Error(f"{args.prompt_schedule}: {exc}") from None
        args.prompt = split_schedule(schedule, args.prompt)[0]
    estimate = engine.check_memory(num_chunks=args.chunks, search=search, height=args.height, width=args.width)
    factor = engine.vae.spatial_factor
    stream_cfg = engine.config.stream
    height = args.height or stream_cfg.latent_height * factor
    width = args.width or stream_cfg.latent_width * factor
    check_room(output.parent, args.chunks * engine.vae.frames_per_chunk(False, stream_cfg.chunk_frames), height, width)
    bar = None
    seen = 0
    info: dict = {}
    writer = Mp4StreamWriter(output, fps=fps)
    seeds: list[int] = []
    status = "running"
    written_record = False

    def record() -> dict:
        data = {"prompt": args.prompt, "status": status, "num_frames": writer.frames_written,
                "frame_size": list(writer.size) if writer.size else [height, width], "fps": fps,
                "final_chunks": len(seeds), "chunk_seeds": list(seeds), "video": str(output),
                "command": ["streamt1", *sys.argv[1:]], "memory_estimate": estimate.to_dict(),
                "search": search.used_dict(), "seed": args.seed, "num_chunks": args.chunks}
        data.update({k: v for k, v in info.items() if k != "records"})
        data["chunks"] = [r.to_dict() for r in info.get("records", [])]
        if failure is not None:
            data["error"] = str(failure)
        data.update(writer_fields())  # who writes it and when: a "running" record of a dead process did not finish
        return data

    def save_record() -> None:
        nonlocal written_record
        with guard.writing():
            write_json(record_path, record())
            written_record = True

    def progress(done, total):
        nonlocal seen, bar
        if bar is None:  # created on the first finished chunk, so input errors print alone
            bar = tqdm(total=total, unit="chunk", disable=args.no_progress, file=sys.stderr, initial=0)
        bar.update(done - seen)
        seen = done
        save_record()

    interrupted = failure = None
    with SignalGuard() as guard:
        try:
            try:
                for chunk in engine.stream(args.prompt, num_chunks=args.chunks, seed=args.seed, search=search,
                                           short_reward=args.short_reward, long_reward=args.long_reward,
                                           final_reward=args.final_reward, height=args.height, width=args.width,
                                           progress=progress, info=info, prompt_schedule=schedule):
                    with guard.writing():
                        writer.append(chunk.frames.numpy())
                        seeds.append(chunk.seed)
                    save_record()  # the record says what the video holds, whatever ends the run next
                status = "complete"
            except Interrupted as exc:
                interrupted, status = exc, "interrupted"
            except StreamT1Error as exc:  # e.g. non-finite latents or out of memory at a later chunk
                failure, status = exc, "failed"
            finally:
                if bar is not None:
                    bar.close()
            with guard.writing(check=False):  # finishing the output is not interrupted
                if writer.frames_written:  # the record first: a video never appears without its record
                    write_json(record_path, record())
                    written_record = True
                    writer.close()
                else:
                    writer.abort()
                    if written_record:
                        write_json(record_path, record())
        except OSError as exc:
            writer.abort()
            if written_record:
                record_path.unlink(missing_ok=True)
            raise StreamT1Error(f"cannot write {exc.filename or output}: {exc.strerror or exc}") from None
        except BaseException:
            writer.abort()
            if written_record:
                record_path.unlink(missing_ok=True)
            raise
    if args.verbose:
        for chunk_record in info.get("records", []):
            _log_record(chunk_record)
    if failure is not None:
        if not writer.frames_written:
            raise failure
        raise StreamT1Error(f"{failure} (kept the {len(seeds)} final chunks before it: {output}, {record_path})")
    if interrupted is not None:
        kept = f"kept {output} ({writer.frames_written} frames of {len(seeds)} final chunks) and {record_path}" \
            if writer.frames_written else f"no chunk was final yet; {record_path} says so" if written_record else \
            "nothing was written"
        print(f"interrupted by {interrupted}: {kept}", file=sys.stderr)
        return 128 + interrupted.signum
    print(f"wrote {output} ({writer.frames_written} frames, {width}x{height}, {fps} fps) and {record_path}")
    return 0


def inspect_run(args) -> int:
    """One line on the run behind a video or record; exit 0 only for a run that finished ("complete")."""
    from .run_record import describe_run

    state, line = describe_run(args.path)
    print(line)
    return 0 if state == "complete" else 1


def _warn_ignored(args, search: SearchConfig) -> None:
    """Options the chosen strategy does not use are named once, so nobody believes they took effect."""
    defaults = SearchConfig()
    options = {item.field: item.option for item in field_flags(SearchConfig)}
    given = [options[name] for name in search.ignored_options if getattr(search, name) != getattr(defaults, name)]
    if given:
        print(f"warning: --search {search.strategy} ignores {', '.join(given)}", file=sys.stderr)


def check_port(port: int) -> None:
    """A TCP port, checked while parsing: a bad one must not wait for the model to load to fail."""
    if not 0 <= port <= 65535:
        raise StreamT1Error(f"--port must be in 0..65535, got {port}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse once; with ``--config``, parse again with the YAML's values as defaults, so explicit flags win."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        check_port(args.port)
    defaults = {}
    if getattr(args, "preset", None):
        defaults.update(RUN_PRESETS[args.preset].cli_defaults())
    if getattr(args, "config", None):
        defaults.update(upstream_defaults(args.config))
    if defaults:
        args = build_parser(defaults).parse_args(argv)
    return args


@contextmanager
def one_line_warnings():
    """Warnings (a default taken for a key a model folder leaves out, ...) print as ``warning: ...``, one line,
    not Python's two lines of file, line number and source."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> int:
    with one_line_warnings():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_args(argv)
    except StreamT1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "serve":
            from .serving.command import serve

            return serve(args)
        if args.command == "inspect":
            return inspect_run(args)
    except StreamT1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())

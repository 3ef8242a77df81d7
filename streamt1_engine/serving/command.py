"""``streamt1 serve``: load one engine and serve it over HTTP and WebSocket with uvicorn."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from .security import API_KEY_ENV


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from .limits import ServerLimits

    d = ServerLimits()
    p = sub.add_parser("serve", help="serve the engine over HTTP/WebSocket (needs the serve extra)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="tiny", help="as for generate: tiny, random-tiny, a directory or checkpoint")
    p.add_argument("--text-encoder", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--lora", default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto",
                   choices=["auto", "torch", "triton", "sdpa", "flash_attn", "xformers"])
    p.add_argument("--memory-limit", default="auto", help="as for generate")
    p.add_argument("--threads", type=int, default=None, help="CPU compute threads (default as for generate)")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="streams generated at once (their candidates denoise in one batch)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="streams waiting beyond --max-streams; one more is answered 429")
    p.add_argument("--kv-pages", type=int, default=None, help="fixed KV pool size in pages (default: grown as needed)")
    p.add_argument("--max-batch", type=int, default=None, help="most candidates in one forward")
    p.add_argument("--max-chunks", type=int, default=d.max_chunks, help="most chunks one request may ask for")
    p.add_argument("--max-candidates", type=int, default=d.max_candidates,
                   help="most candidates per chunk one request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body / message")
    p.add_argument("--short-reward", default=None, help="short-term reward of every request (default: the model's)")
    p.add_argument("--long-reward", default=None, help="long-term reward of every request")
    p.add_argument("--final-reward", default=None, help="final-pick reward of every request")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="HOST[,HOST...]",
                   help="Host names besides the server's own that requests may name (name or name:port; '*': "
                        "any); bound to loopback the own names are localhost, 127.0.0.1 and [::1] on --port, bound "
                        "to 0.0.0.0 the loopback names, this machine's name and any IP address (DNS-rebinding "
                        "protection)")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN[,ORIGIN...]",
                   help="origins (scheme://host[:port], '*': any) besides the server's own whose web pages may "
                        "use it; a request with any other Origin header is refused")
    p.add_argument("--api-key", default=None,
                   help=f"require this token on every route but /health (Authorization: Bearer KEY, or ?token=KEY "
                        f"for the WebSocket and the page); default ${API_KEY_ENV}, which keeps it off the "
                        "command line")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def access_policy(args):
    """The serve command's AccessPolicy (checked, like the limits, before the model loads)."""
    from .security import AccessPolicy

    return AccessPolicy.from_environment(bind_host=args.host, bind_port=args.port, allowed_hosts=args.allowed_hosts,
                                         allowed_origins=args.allowed_origins, api_key=args.api_key)


class RedactTokens(logging.Filter):
    """Uvicorn logs each request's path with its query string: the ``token`` a browser passes is masked."""

    _token = re.compile(r"([?&]token=)[^&\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._token.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._token.sub(r"\1***", record.msg)
        return True


def engine_options(args) -> dict:
    """``from_pretrained`` keyword arguments of a serve command line (also used by the Ray deployment)."""
    from ..memory import parse_size

    return dict(device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
                text_encoder=args.text_encoder, vae=args.vae, lora=args.lora, lora_alpha=args.lora_alpha,
                memory_limit=parse_size(args.memory_limit) if args.memory_limit != "auto" else "auto",
                max_streams=args.max_streams, max_queue=args.max_queue, kv_pages=args.kv_pages,
                max_batch=args.max_batch)


def server_limits(args):
    from .limits import ServerLimits

    return ServerLimits(max_streams=args.max_streams + args.max_queue, max_chunks=args.max_chunks,
                        max_candidates=args.max_candidates, max_body_bytes=args.max_body_bytes)


def reward_options(args) -> dict:
    names = dict(short_reward=args.short_reward, long_reward=args.long_reward, final_reward=args.final_reward)
    return {k: v for k, v in names.items() if v is not None}


def serve(args) -> int:
    from ..errors import require_packages

    require_packages("streamt1 serve", "fastapi", "uvicorn", "websockets", extra="serve")
    import torch
    import uvicorn

    from ..cli import default_threads
    from ..engine import StreamT1Engine
    from .app import create_app

    from .security import exposure_warning

    limits = server_limits(args)  # checked before the model loads
    access = access_policy(args)
    torch.set_num_threads(args.threads or default_threads())
    engine = StreamT1Engine.from_pretrained(args.model, **engine_options(args))
    app = create_app(engine, limits, submit_options=reward_options(args), close_engine=True, access=access)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            # above the limit, so that the app's own check answers an oversized message clearly
                            ws_max_size=4 * limits.max_body_bytes)
    for name in ("uvicorn.access", "uvicorn.error"):  # after the Config, which sets up uvicorn's logging
        logging.getLogger(name).addFilter(RedactTokens())
    warning = exposure_warning(access, args.host, args.port)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1  # not started: uvicorn has logged why (e.g. the port is taken)

"""``lightning-lab serve``: the proxy as a long-running process (foreground, Ctrl-C stops it)."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from .limits import Limits

__all__ = ["add_cli"]


def add_cli(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible endpoint over a model (traced per rollout URL)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>'")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (requires --api-key)")
    p.add_argument("--checkpoint", default=None, help="trainer checkpoint dir to load weights from")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens per request")
    p.add_argument("--max-tokens-cap", type=int, default=None,
                   help="clamp every request's max_tokens to this (default: no cap)")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="another name requests may give as 'model' (repeatable; others get 404)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="enable POST /v1/load_lora_adapter for checkpoints under DIR "
                        "(repeatable; requires --api-key)")
    p.add_argument("--max-queued-tokens", type=int, default=Limits.max_queued_tokens,
                   help="tokens (prompt + n x max_tokens) all requests in flight may cost; "
                        "more get 429")
    p.add_argument("--max-request-tokens", type=int, default=Limits.max_request_tokens,
                   help="tokens one request may cost; more get 400")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lightning_lab.inference import models
    from lightning_lab.errors import ConfigError
    from lightning_lab.inference.adapters import lora_flag

    from .server import ServeConfig, check_bind, serve

    # Validate the bind before spending seconds loading a model.
    try:
        check_bind(ServeConfig(host=args.host, api_key=args.api_key, allow_remote=args.allow_remote))
    except ValueError as exc:
        raise ConfigError(f"--host: {exc}") from exc
    if args.adapter_dir and not args.api_key:
        raise ConfigError("--adapter-dir enables load_lora_adapter, which needs --api-key")
    policy = models.load(args.model, lora=lora_flag(args.lora), device=args.device, seed=args.seed)
    if args.checkpoint:
        from lightning_lab.train.checkpoint import load_policy_weights

        load_policy_weights(policy, Path(args.checkpoint))
    server = serve(policy, args.host, args.port, api_key=args.api_key,
                   allow_remote=args.allow_remote, default_max_tokens=args.max_tokens,
                   max_tokens_cap=args.max_tokens_cap,
                   served_model_names=tuple(args.served_model_name),
                   log_level="info", adapter_dirs=tuple(args.adapter_dir),
                   limits=Limits(max_queued_tokens=args.max_queued_tokens,
                                 max_request_tokens=args.max_request_tokens))
    print(f"serving {policy.name} at {server.base_url}  (traced: {server.url}/rollout/<id>/v1; "
          "endpoints: chat/completions, completions, responses, models)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0

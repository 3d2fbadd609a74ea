"""``lightning-lab serve``: the proxy as a long-running process (foreground, Ctrl-C stops it)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable

from .config import ServeConfig, check_bind
from .limits import Limits

__all__ = ["add_cli", "serve_config", "api_key_of", "API_KEY_ENV"]

API_KEY_ENV = "LIGHTNING_LAB_API_KEY"
"""The API key when neither --api-key nor --api-key-file is given (keeps it out of ``ps``)."""


def add_cli(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible endpoint over a model (traced per rollout URL)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer <key>' (visible in `ps`: prefer "
                        f"--api-key-file or ${API_KEY_ENV})")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from the first line of PATH")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (requires --api-key and --allowed-host)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host-header name to answer (repeatable; '*': any); default: the "
                        "loopback names")
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
    from lightning_lab.inference import models
    from lightning_lab.errors import ConfigError
    from lightning_lab.inference.adapters import lora_flag

    from .server import serve

    config = serve_config(args)  # the key and the bind, before seconds go into loading a model
    try:
        check_bind(config)
    except ValueError as exc:
        raise ConfigError(f"--host: {exc} (flags: --allow-remote, --api-key-file, "
                          "--allowed-host)") from exc
    policy = models.load(args.model, lora=lora_flag(args.lora), device=args.device, seed=args.seed)
    if args.checkpoint:
        from lightning_lab.inference.checkpoints import load_policy_weights

        load_policy_weights(policy, Path(args.checkpoint))
    server = serve(policy, config)
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


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ``ServeConfig`` the flags describe; a usage error names the flag."""
    from lightning_lab.errors import ConfigError

    api_key = api_key_of(args)
    if args.adapter_dir and not api_key:
        raise ConfigError("--adapter-dir enables load_lora_adapter, which needs --api-key")
    return ServeConfig(
        host=args.host, port=args.port, api_key=api_key, allow_remote=args.allow_remote,
        default_max_tokens=args.max_tokens, max_tokens_cap=args.max_tokens_cap,
        served_model_names=args.served_model_name, log_level="info",
        adapter_dirs=args.adapter_dir, allowed_hosts=args.allowed_host,
        limits=Limits(max_queued_tokens=args.max_queued_tokens,
                      max_request_tokens=args.max_request_tokens))


def api_key_of(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key``, ``--api-key-file`` or ``$LIGHTNING_LAB_API_KEY`` (first set
    wins, flags may not both be given); a blank key is refused: no client could match it."""
    from lightning_lab.errors import ConfigError

    if args.api_key is not None and args.api_key_file is not None:
        raise ConfigError("give one of --api-key and --api-key-file")
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file}: {exc}") from exc
        key, source = (lines[0].strip() if lines else ""), f"--api-key-file {args.api_key_file}"
    elif args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif os.environ.get(API_KEY_ENV) is not None:
        key, source = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not key.strip() or key != key.strip():
        raise ConfigError(f"{source}: the API key is blank or has surrounding whitespace, so no "
                          "client could ever authenticate with it")
    return key

"""``rlhf-lightning label`` (serve the labelling page) and ``rlhf-lightning label export``.

Bad input (candidates file, prompts file, policy folder, annotations file, guidelines file,
port in use, a public address without a token) raises
:class:`~rlhf_lightning.errors.UserInputError`, which the main command prints on one line with
exit status 2. All of it is checked before the server starts.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..records import read_prompts
from ..errors import UserInputError
from ..generation import GenerationSettings
from .candidates import (
    CandidateGenerator,
    CandidatePool,
    SamplingSettings,
    check_policy,
    read_candidates,
)
from .export import KEEP_CHOICES, export_annotations
from .storage import AnnotationLog, read_annotations

TOKEN_ENV = "RLHF_LABEL_TOKEN"


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-lightning label",
        description="Collect preference judgements in the browser. Subcommand: "
                    "'rlhf-lightning label export --help' turns them into preference pairs.",
    )
    source = parser.add_argument_group("candidates: --candidates FILE, or --policy DIR with --prompts FILE")
    source.add_argument("--candidates", help='JSONL of {"prompt", "responses": [...]} to label')
    source.add_argument("--policy", help="model folder (or preset) to sample candidates from")
    source.add_argument("--prompts", help='JSONL of {"prompt"} (or {"messages"}) records to sample for')
    source.add_argument("--candidates-out", help="where sampled candidates are kept "
                        "(default: next to --annotations, ending in .candidates.jsonl)")
    sampling = parser.add_argument_group("sampling (with --policy)")
    sampling.add_argument("--k", type=int, default=2, help="responses per prompt; more than 2 are ranked")
    sampling.add_argument("--max-new-tokens", type=int, default=64)
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed + index)")
    parser.add_argument("--annotations", required=True, help="annotations JSONL (appended to; resumed from)")
    parser.add_argument("--guidelines", help="Markdown or plain-text file of labelling guidelines, "
                        "shown on the page as plain text")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback serves other machines and needs a token")
    server.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    server.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"access token (default: ${TOKEN_ENV}; generated when --host is not loopback)")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-lightning label export",
        description="Turn annotations into preference pairs for the reward stage; print agreement.",
    )
    parser.add_argument("--annotations", required=True, help="annotations JSONL written by 'rlhf-lightning label'")
    parser.add_argument("--out", required=True, help="preference JSONL to write")
    parser.add_argument("--ties", choices=KEEP_CHOICES, default="drop", help="flag: keep ties with \"tie\": true")
    parser.add_argument("--skips", choices=KEEP_CHOICES, default="drop",
                        help="flag: keep skips with \"skipped\": true")
    return parser


def build_pool(options: argparse.Namespace) -> tuple[CandidatePool, CandidateGenerator | None]:
    """The candidate pool, and the generator thread that fills it when sampling (not started)."""
    if options.candidates and options.policy:
        raise UserInputError("give either --candidates or --policy with --prompts, not both")
    if options.candidates:
        return CandidatePool(read_candidates(options.candidates)), None
    if not options.policy or not options.prompts:
        raise UserInputError("nothing to label: pass --candidates FILE, or --policy DIR with --prompts FILE")
    check_policy(options.policy)
    generation = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                    top_k=options.top_k, top_p=options.top_p)
    settings = SamplingSettings(k=options.k, generation=generation, seed=options.seed)
    annotations = Path(options.annotations)
    out = options.candidates_out or annotations.with_name(annotations.stem + ".candidates.jsonl")
    prompts = read_prompts(options.prompts)
    pool = CandidatePool(expected=len(prompts))
    return pool, CandidateGenerator(options.policy, prompts, out, pool, settings)


def read_guidelines(path: str | None) -> str | None:
    """The text of the ``--guidelines`` file (``None`` without one); unreadable or blank is an error."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserInputError(f"--guidelines {path}: cannot read it ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise UserInputError(f"--guidelines {path}: not UTF-8 text ({err.reason})") from err
    if not text.strip():
        raise UserInputError(f"--guidelines {path}: the file is empty")
    return text


def make_server(app: Any, host: str, port: int) -> Any:
    """A threaded Werkzeug server on a socket bound here, so a port in use is a one-line error
    (Werkzeug's own bind prints and exits instead)."""
    from werkzeug.serving import make_server as werkzeug_server

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # still refuses a port in use
            listener.bind(address)
            listener.listen(128)
            return werkzeug_server(host, listener.getsockname()[1], app, threaded=True, fd=listener.fileno())
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserInputError(f"port {port} on {host} is in use; hint: pass another --port, or --port 0 "
                                 "to pick a free one") from err
        raise UserInputError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err


def open_labelling_page(pool: CandidatePool, annotations: str | os.PathLike[str], host: str, port: int,
                        token: str | None = None, seed: int = 0, guidelines: str | None = None) -> tuple[Any, str]:
    """Check the annotations and guidelines files, bind the server (not serving yet) and return
    it with the address to open (with the token; one is generated for a non-loopback ``host``
    without one). ``rlhf-lightning label`` and ``rlhf-lightning iterate`` both serve this way."""
    try:
        from .app import LabelSession, create_app, is_loopback
    except ImportError as err:
        raise UserInputError(f"the labelling page needs Flask ({err}); "
                             "hint: pip install 'rlhf-lightning[label]'") from err
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(16)
    read_annotations(annotations)  # a bad line fails here, not in every request
    session = LabelSession(pool=pool, log=AnnotationLog(annotations), token=token, seed=seed,
                           guidelines=read_guidelines(guidelines))
    server = make_server(create_app(session), host, port)
    shown_host = f"[{host}]" if ":" in host else host
    return server, f"http://{shown_host}:{server.port}/" + (f"?token={token}" if token else "")


def serve_command(argv: Sequence[str]) -> int:
    options = serve_parser().parse_args(list(argv))
    pool, generator = build_pool(options)
    server, address = open_labelling_page(pool, options.annotations, options.host, options.port, options.token,
                                          options.seed, options.guidelines)
    if generator is not None:
        generator.start()
        print(f"sampling candidates in the background into {generator.out.path}", flush=True)
    print(f"labelling {pool.total} items; annotations go to {options.annotations}", flush=True)
    print(f"open {address}  (Ctrl-C stops; every submitted label is already on disk)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if generator is not None:
            generator.stop()
        server.server_close()
    return 0


def export_command(argv: Sequence[str]) -> int:
    options = export_parser().parse_args(list(argv))
    summary = export_annotations(options.annotations, options.out, ties=options.ties, skips=options.skips)
    print(f"{summary.pairs} preference pairs from {summary.judgements} judgements -> {options.out}")
    for line in summary.agreement.lines():
        print(line)
    return 0


def label_command(argv: Sequence[str]) -> int:
    """``rlhf-lightning label ...``: ``export`` as first argument exports, anything else serves."""
    argv = list(argv)
    if argv[:1] == ["export"]:
        return export_command(argv[1:])
    return serve_command(argv)

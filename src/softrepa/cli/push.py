"""`softrepa push`: upload soft tokens, their layout, training config and a model card to the Hub."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tokens", help="tokens .safetensors file or run folder (holding tokens.safetensors)")
    p.add_argument("repo_id", help="target Hub model repo, owner/name (created when missing)")
    p.add_argument("--config", default=None,
                   help="training config YAML to upload (default: the one recorded in the tokens file, else the "
                        "run folder's config.yaml)")
    p.add_argument("--evaluation", action="append", default=[], metavar="DIR",
                   help="`softrepa evaluate` output folder whose metrics go into the model card (repeatable)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--filename", default="tokens.safetensors", help="the tokens file's name in the repo")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")


def run(args: argparse.Namespace) -> int:
    from ..publish import push_to_hub

    info = push_to_hub(args.tokens, args.repo_id, config=args.config, evaluation=args.evaluation,
                       private=True if args.private else None, token=args.token, revision=args.revision,
                       commit_message=args.message, filename=args.filename)
    print(f"pushed {args.tokens} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0

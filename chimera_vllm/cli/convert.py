"""Commands that carry drafts across formats: the authors' checkpoints in, vLLM's Medusa and
speculators eagle3 formats out."""

from __future__ import annotations

import argparse

from chimera_vllm.cli import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert-official",
        help="import kafkayu/Chimera's released .pt files",
        parents=[options.target(), options.dtype("float32")],
    )
    c.add_argument("--official", required=True, help="directory with trimlp.pt, fast_layer1.pt, chimera_head.pt")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert_official)

    x = sub.add_parser(
        "export-medusa",
        help="a Medusa-baseline draft in vLLM's built-in Medusa format",
        parents=[
            options.target(),
            options.draft(required=True, help="a draft trained with --head-type medusa"),
            options.dtype("bfloat16"),
        ],
    )
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export_medusa)

    e = sub.add_parser(
        "export-eagle3",
        help="an EAGLE-3 draft in the speculators eagle3 format, served by vLLM's own EAGLE-3 proposer",
        parents=[
            options.draft(required=True, help="a draft trained with --head-type eagle3"),
            options.dtype("bfloat16"),
        ],
    )
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export_eagle3)


def cmd_convert_official(args: argparse.Namespace) -> None:
    from chimera_vllm.model.checkpoint import convert_official
    from chimera_vllm.reference.target import load_target

    target = load_target(args.target, args.dtype)
    draft = convert_official(target, args.target, args.official)
    draft.save_pretrained(args.out)
    print(f"converted the official checkpoint in {args.official} to {args.out}")


def cmd_export_medusa(args: argparse.Namespace) -> None:
    from chimera_vllm.model.base import TargetParts
    from chimera_vllm.model.checkpoint import export_vllm_medusa
    from chimera_vllm.model.medusa import MedusaDraft
    from chimera_vllm.reference.target import load_target

    target = load_target(args.target, args.dtype)
    draft = MedusaDraft.from_pretrained(args.draft, target.config)
    export_vllm_medusa(draft, TargetParts.from_model(target), args.out)
    print(f"wrote {args.out}: vLLM's Medusa format (speculative method medusa)")
    if draft.draft_vocab is not None:
        print("note: vLLM's Medusa drafts from the whole vocabulary (its loader rejects a token_map)")


def cmd_export_eagle3(args: argparse.Namespace) -> None:
    from chimera_vllm.model.checkpoint import export_vllm_eagle3
    from chimera_vllm.model.eagle3 import Eagle3Draft
    from chimera_vllm.reference.target import resolve_dtype

    draft = Eagle3Draft.from_pretrained(args.draft)
    export_vllm_eagle3(draft, args.out, resolve_dtype(args.dtype))
    print(f"wrote {args.out}: speculators eagle3 format (speculative method eagle3, or `vllm serve {args.out}`)")

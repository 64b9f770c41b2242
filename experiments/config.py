"""Parameter counts and memory of every preset, and where the 124M model's parameters sit.

    python -m experiments.config    # writes results/config/results.{json,md}
"""

from __future__ import annotations

import math

from experiments.common import markdown_table, write_report
from jaxllm.config import GPT_CONFIG_124M, PRESETS, GPTConfig, count_params, param_bytes, param_shapes

# Top-level keys of the parameter tree, named as the classic chapter lists them.
COMPONENTS = {
    "tok_emb": "token embedding",
    "pos_emb": "position embedding",
    "blocks": "transformer blocks",
    "final_norm": "final norm",
    "out_head": "output head",
}


def count_by_component(config: GPTConfig) -> dict[str, int]:
    """Parameters per component (absent components, e.g. a tied output head, count 0)."""
    counts = dict.fromkeys(COMPONENTS.values(), 0)
    for path, shape in param_shapes(config).items():
        counts[COMPONENTS[path.split("/")[0]]] += math.prod(shape)
    return counts


def megabytes(config: GPTConfig) -> float:
    return param_bytes(config) / 2**20


def main() -> None:
    presets = []
    for name, config in PRESETS.items():
        tied = config.replace(tie_embeddings=True)
        release = config.replace(tie_embeddings=True, qkv_bias=True)
        presets.append({
            "preset": name, "emb_dim": config.emb_dim, "n_layers": config.n_layers,
            "n_heads": config.n_heads, "tie_embeddings": config.tie_embeddings,
            "params_untied": count_params(config.replace(tie_embeddings=False)),
            "params_tied": count_params(tied),
            "params_tied_qkv_bias": count_params(release),
            "mb_float32_untied": megabytes(config.replace(tie_embeddings=False)),
            "mb_float32_tied": megabytes(tied),
            "mb_bfloat16_tied": megabytes(tied.replace(param_dtype="bfloat16")),
        })
    preset_table = markdown_table(
        ["preset", "emb", "layers", "heads", "params (untied)", "MB fp32 (untied)",
         "params (tied)", "MB fp32 (tied)", "MB bf16 (tied)", "tied + qkv bias"],
        [(p["preset"], p["emb_dim"], p["n_layers"], p["n_heads"], f"{p['params_untied']:,}",
          f"{p['mb_float32_untied']:.2f}", f"{p['params_tied']:,}", f"{p['mb_float32_tied']:.2f}",
          f"{p['mb_bfloat16_tied']:.2f}", f"{p['params_tied_qkv_bias']:,}") for p in presets],
    )

    breakdown = count_by_component(GPT_CONFIG_124M)
    total = count_params(GPT_CONFIG_124M)
    assert sum(breakdown.values()) == total
    per_block = breakdown["transformer blocks"] // GPT_CONFIG_124M.n_layers
    rows = [(part, f"{n:,}", f"{100 * n / total:.1f}%") for part, n in breakdown.items()]
    rows.append(("total", f"{total:,}", "100.0%"))
    rows.append(("total without the output head (tied)", f"{total - breakdown['output head']:,}", ""))
    breakdown_table = markdown_table(["component", "parameters", "share"], rows)

    markdown = (
        "# Parameter counts and memory\n\n"
        "Every preset untied (separate output head) and tied (head shares the token embedding); "
        "the last column is the released GPT-2 layout (tied, bias on the qkv projection). "
        "MB = 2**20 bytes of parameters alone.\n\n"
        f"{preset_table}\n## GPT_CONFIG_124M by component\n\n"
        f"{GPT_CONFIG_124M.n_layers} blocks of {per_block:,} parameters each.\n\n{breakdown_table}"
    )
    write_report("config", {"presets": presets,
                            "gpt_config_124m": {"components": breakdown, "total": total,
                                                "per_block": per_block,
                                                "mb_float32": megabytes(GPT_CONFIG_124M)}},
                 markdown)


if __name__ == "__main__":
    main()

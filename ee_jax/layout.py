"""Migration of checkpoints saved in an earlier parameter layout.

Until 2026-12-07 `EarlyExitLM` kept every parameter but the blocks at the top
level: the exit norms and classifiers as raw [L, D] arrays, the embeddings and
output weights side by side. Now they live in Linen modules (`ee_jax.heads`):

    earlier (flat)                          now
    token_embed, position_embed             embedder/token_embed, embedder/position_embed
    tail{k}_projection, tail{k}_embedding   embedder/... ("tied" output: adaptive input)
    unembed_*, head_*, cluster_kernel,      output/... (the output layers)
      tail{k}_kernel / _bias / _projection
    exit_norm_scale / _bias [L, D]          exits/norm_scale / norm_bias
    classifier_norm_scale / _bias [L, D]    exits/classifier_norm_scale / _bias
    classifier_kernel [L, D], _bias [L]     exits/classifier_kernel, classifier_bias

`Checkpointer.restore` reads a step's recorded tree first; for the earlier layout
it restores into `earlier_layout(template)` and returns `upgrade(restored)`. Both
act on every {"params": ...} subtree (the parameters and the AdamW moments mu
and nu, which mirror them), so a run of the earlier layout also resumes
training. The same idea as flax's `convert_pre_linen` and big_vision's
`fix_old_checkpoints`.
"""

import re

import jax

_EXIT_ARRAYS = {  # earlier name -> name in exits/ (same shape)
    "exit_norm_scale": "norm_scale",
    "exit_norm_bias": "norm_bias",
    "classifier_norm_scale": "classifier_norm_scale",
    "classifier_norm_bias": "classifier_norm_bias",
    "classifier_kernel": "classifier_kernel",
    "classifier_bias": "classifier_bias",
}
_EMBEDDER = re.compile(r"token_embed|position_embed|tail\d+_embedding")


def is_earlier_layout(tree) -> bool:
    """Whether a checkpoint's tree (arrays or orbax metadata) has the flat layout."""
    return any(_is_earlier_params(node) for node in _params_trees(tree))


def upgrade(tree):
    """`tree` with every {"params": <flat layout>} subtree in today's layout."""
    return _map_params(tree, _upgrade_params)


def earlier_layout(tree):
    """`upgrade`'s inverse: today's layout (arrays or jax.ShapeDtypeStruct) -> flat."""
    return _map_params(tree, _downgrade_params)


def _upgrade_params(params: dict) -> dict:
    if not _is_earlier_params(params):
        return params
    tied = any(name.endswith("_embedding") for name in params)
    new = {"embedder": {}, "blocks": params["blocks"], "exits": {}, "output": {}}
    for name, value in params.items():
        if name in _EXIT_ARRAYS:
            new["exits"][_EXIT_ARRAYS[name]] = value
        elif _EMBEDDER.fullmatch(name) or (tied and name.endswith("_projection")):
            new["embedder"][name] = value
        elif name != "blocks":
            new["output"][name] = value
    return new


def _downgrade_params(params: dict) -> dict:
    if _is_earlier_params(params) or "exits" not in params:
        return params
    flat = {**params["embedder"], "blocks": params["blocks"], **params["output"]}
    for name, new_name in _EXIT_ARRAYS.items():
        flat[name] = params["exits"][new_name]
    return flat


def _is_earlier_params(node) -> bool:
    return isinstance(node, dict) and "exit_norm_scale" in node


def _is_holder(node) -> bool:
    """A {"params": <the model's parameters>} dict (variables, or an AdamW moment)."""
    return (
        isinstance(node, dict)
        and isinstance(node.get("params"), dict)
        and ("blocks" in node["params"])
    )


def _params_trees(tree) -> list:
    """The model parameter dicts of every holder in a nested tree."""
    nodes = jax.tree.leaves(tree, is_leaf=_is_holder)
    return [node["params"] for node in nodes if _is_holder(node)]


def _map_params(tree, fn):
    return jax.tree.map(
        lambda node: {**node, "params": fn(node["params"])} if _is_holder(node) else node,
        tree,
        is_leaf=_is_holder,
    )

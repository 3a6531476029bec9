"""A custom sparse-attention method: a different N:M pattern per layer.

Run: python examples/custom_method.py

A method is a ``SparseAttentionMethod`` subclass registered under a name; configs select
it with ``"method": name``. The base class is already a complete fused method, so this one
overrides a single hook, ``kernel_kwargs``, which runs once per module at conversion time.
(``attention`` can be overridden too, to change the computation itself.)
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import modelopt_sparse as mts


@mts.register_method("layerwise_nm")
class LayerwiseNM(mts.SparseAttentionMethod):
    """A denser pattern in the first layers, where attention tends to be less peaked.

    The first quarter of the layers (at least one) keeps 4 of every 8 scores; the other
    layers use the N:M of the config.
    """

    def kernel_kwargs(self, module_name, module):
        kwargs = super().kernel_kwargs(module_name, module)
        num_layers = module.config.num_hidden_layers
        if module.layer_idx < max(1, num_layers // 4):
            kwargs.update(sparsity_n=4, sparsity_m=8)
        return kwargs


def tiny_llama(seed: int = 0):
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def main():
    model = tiny_llama()
    config = {"sparse_cfg": {"default": {"method": "layerwise_nm", "sparsity_n": 2, "sparsity_m": 8,
                                         "dense_window_size": 16}}}
    mts.sparsify(model, config)
    table = mts.print_summary(model)
    assert "4:8" in table and "2:8" in table

    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    # Restoring needs the method registered in the restoring process too (it is, above).
    with tempfile.TemporaryDirectory() as tmp:
        mts.save(model, tmp)
        fresh = mts.restore(tiny_llama(seed=1), tmp)
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, reference)
    print("OK")


if __name__ == "__main__":
    main()

"""How a query looks at its support inside a Stable Diffusion U-Net.

Both diffusion methods run the U-Net twice per episode: first on the support ("write"
pass), then on the query ("read" pass). What the support pass leaves behind, and how the
query pass uses it, is one of two *support-attention forms*:

``kv_concat`` (DiffewS; the released SD-FSMIS code)
    Every self-attention of every ``BasicTransformerBlock`` stores its keys and values in
    the write pass. In the read pass the query's self-attention attends over
    ``[own tokens ; support tokens]``: keys and values are concatenated along the token
    axis (``n`` shots concatenate along that axis too). No new parameters.

``cross_attention`` (the SD-FSMIS paper, Eq. 1: ``FFN(CAttn(CAttn(SAttn(z_q), z_s), E))``)
    Every ``BasicTransformerBlock`` gains a new cross-attention, placed between its
    self-attention and its text cross-attention, from the query's tokens to the support's
    tokens of the same block. The support tokens ``z_s`` are the support's hidden states at
    that same point (after its self-attention), stored in the write pass.

Initialisation of the added SII layer (a choice; the paper does not say): its LayerNorm
is copied from the block's ``norm1`` and its q/k/v projections from the block's
self-attention (support and query tokens live in the same feature space, so the pretrained
projections give meaningful attention from the first step); its output projection is
**zero-initialised**, so at initialisation the block computes exactly what the pretrained
block computes and training grows the support pathway from there (ControlNet-style).

The pass mode travels in ``cross_attention_kwargs`` (``bank``, ``bank_mode``, ``shots``),
not in module state, so that gradient checkpointing, which re-runs a block during the
backward pass with the original arguments, recomputes the same pass.

A third mode, ``joint``, runs both passes as one U-Net batch: rows ``[support ; query]``,
``B * S`` support rows then ``B`` query rows. Nothing in a U-Net mixes rows except the
support attention, and a support row never reads a query row, so each block hands the
query rows what the write pass would have stored, from the support rows of the same batch.
The result is the two-pass result up to float rounding, with half the kernel launches and
weights read once (a training step on a GPU is bound by both at SD's 32 x 32 latents).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

SupportAttentionForm = Literal["kv_concat", "cross_attention"]
BankMode = Literal["off", "write", "read", "joint"]
SUPPORT_ATTENTION_FORMS: tuple[str, ...] = ("kv_concat", "cross_attention")


class AttentionBank:
    """What one support pass leaves for the query pass: layer name -> tensors.

    Entries are stored per *episode*: a write pass over ``B * S`` support images (``S``
    shots per episode) stores ``(B, S * N, C)`` tensors, the shots side by side on the
    token axis. A read pass with batch ``Bq`` takes entries of batch ``Bq``, or of batch 1
    broadcast to ``Bq`` (one support shared by many query slices, without a copy).
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[torch.Tensor, ...]] = {}

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, name: str, tensors: tuple[torch.Tensor, ...], shots: int) -> None:
        """Store ``(B * S, N, C)`` tensors of a write pass as ``(B, S * N, C)``."""
        self.entries[name] = tuple(as_episodes(tensor, shots) for tensor in tensors)

    def get(self, name: str, batch: int | None) -> tuple[torch.Tensor, ...]:
        """The entries of layer ``name`` for a read pass of batch ``batch``: ``(batch, S*N, C)``
        (``batch=None``: as stored, ``(B or 1, S*N, C)``)."""
        try:
            tensors = self.entries[name]
        except KeyError:
            raise RuntimeError(
                f"support attention bank has no entry for {name!r}: run the support pass first"
            ) from None
        stored_batch = tensors[0].shape[0]
        if batch is None or stored_batch == batch:
            return tensors
        if stored_batch == 1:
            return tuple(t.expand(batch, -1, -1) for t in tensors)
        raise RuntimeError(f"support bank holds {stored_batch} episodes but the query batch is {batch}")



def bank_kwargs(bank: AttentionBank | None, mode: BankMode, shots: int = 1) -> dict:
    """The ``cross_attention_kwargs`` that select a pass (``joint``: no bank)."""
    return {"bank": bank, "bank_mode": mode, "shots": shots}


def support_rows(rows: int, shots: int) -> int:
    """How many of a ``joint`` batch's ``rows`` (``B * S`` support + ``B`` query) are support rows."""
    if rows % (shots + 1):
        raise ValueError(f"joint batch of {rows} rows is not B * ({shots} shots + 1 query)")
    return rows // (shots + 1) * shots


def as_episodes(tokens: torch.Tensor, shots: int) -> torch.Tensor:
    """``(B * S, N, C)`` support tokens -> ``(B, S * N, C)``: the shots side by side, as stored."""
    total, count, channels = tokens.shape
    if total % shots:
        raise ValueError(f"support batch {total} is not a multiple of shots={shots}")
    return tokens.reshape(total // shots, shots * count, channels)


class PlainAttnProcessor(AttnProcessor2_0):
    """Diffusers' SDPA processor that accepts (and ignores) the bank arguments."""

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        bank: AttentionBank | None = None,
        bank_mode: BankMode = "off",
        shots: int = 1,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def attend_heads(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SDPA with ``attn``'s heads on projected tokens, before the output projection.

    Args:
        query: ``(B, N, D)``; key, value: ``(B, M, D)`` or ``(1, M, D)`` (broadcast to ``B``).
    Returns:
        ``(B, N, D)``.
    """
    batch, tokens, _ = query.shape
    head_dim = query.shape[-1] // attn.heads
    key, value = key.to(query.dtype), value.to(query.dtype)
    if key.shape[0] != batch:
        key, value = key.expand(batch, -1, -1), value.expand(batch, -1, -1)

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, x.shape[1], attn.heads, head_dim).transpose(1, 2)

    query, key, value = split_heads(query), split_heads(key), split_heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value)
    return out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)


def multi_head_attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """:func:`attend_heads` then ``attn``'s output projection: ``(B, N, D)`` -> ``(B, N, C)``
    (before any residual)."""
    return attn.to_out[1](attn.to_out[0](attend_heads(attn, query, key, value)))


class KVBankSelfAttnProcessor:
    """Self-attention that writes its K/V to the bank, or reads the support's K/V from it.

    Args:
        name: the layer's key in the bank.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        bank: AttentionBank | None = None,
        bank_mode: BankMode = "off",
        shots: int = 1,
    ) -> torch.Tensor:
        """``hidden_states``: ``(B, N, C)`` tokens; returns ``(B, N, C)``."""
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise RuntimeError("KVBankSelfAttnProcessor handles plain token self-attention only")
        if attention_mask is not None:
            raise RuntimeError("KVBankSelfAttnProcessor does not support attention masks")
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if bank_mode == "joint":
            # support rows attend to themselves (the write pass), query rows to
            # [own ; their episode's support] (the read pass); one output projection for both
            n = support_rows(hidden_states.shape[0], shots)
            support_key, support_value = key[:n], value[:n]
            query_key = torch.cat([key[n:], as_episodes(support_key, shots)], dim=1)
            query_value = torch.cat([value[n:], as_episodes(support_value, shots)], dim=1)
            heads = torch.cat([
                attend_heads(attn, query[:n], support_key, support_value),
                attend_heads(attn, query[n:], query_key, query_value),
            ])
            out = attn.to_out[1](attn.to_out[0](heads))
        else:
            if bank is not None and bank_mode == "write":
                bank.put(self.name, (key, value), shots)
            elif bank is not None and bank_mode == "read":
                support_key, support_value = bank.get(self.name, hidden_states.shape[0])
                key = torch.cat([key, support_key.to(key.dtype)], dim=1)
                value = torch.cat([value, support_value.to(value.dtype)], dim=1)
            out = multi_head_attention(attn, query, key, value)
        if attn.residual_connection:
            out = out + hidden_states
        # SD's factor is 1.0: dividing by it would cost a kernel forward and one backward
        return out / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else out


class SupportCrossAttentionBlock(BasicTransformerBlock):
    """A ``BasicTransformerBlock`` with the paper's added support cross-attention (SII).

    ``h = h + SAttn(LN1 h)``; write pass: store ``h``; read pass:
    ``h = h + CAttn_s(LN_s h, LN_s z_s)``; then ``h = h + CAttn_E(LN2 h, E)`` and
    ``h = h + FFN(LN3 h)``. Built by :func:`install_support_attention` by changing the class
    of an existing pretrained block and adding ``sii_norm`` and ``sii_attn``.
    """

    sii_name: str
    sii_norm: nn.LayerNorm
    sii_attn: Attention

    def add_support_attention(self, name: str) -> None:
        """Add the SII layers (see the module docstring for their initialisation)."""
        dim = self.norm1.normalized_shape[0]
        self.sii_name = name
        self.sii_norm = nn.LayerNorm(dim, eps=self.norm1.eps, elementwise_affine=self.norm1.elementwise_affine)
        self.sii_attn = Attention(
            query_dim=dim,
            cross_attention_dim=dim,
            heads=self.num_attention_heads,
            dim_head=self.attention_head_dim,
            bias=self.attention_bias,
            out_bias=True,
        )
        self.sii_norm.load_state_dict(self.norm1.state_dict())
        for proj in ("to_q", "to_k", "to_v"):
            getattr(self.sii_attn, proj).load_state_dict(getattr(self.attn1, proj).state_dict())
        nn.init.zeros_(self.sii_attn.to_out[0].weight)
        nn.init.zeros_(self.sii_attn.to_out[0].bias)
        reference = next(self.attn1.parameters())
        self.sii_norm.to(reference.device, reference.dtype)
        self.sii_attn.to(reference.device, reference.dtype)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """``hidden_states``: ``(B, N, C)``; returns ``(B, N, C)``."""
        kwargs = dict(cross_attention_kwargs or {})
        bank: AttentionBank | None = kwargs.get("bank")
        mode: BankMode = kwargs.get("bank_mode", "off")
        shots: int = kwargs.get("shots", 1)

        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        if mode == "joint":
            n = support_rows(hidden_states.shape[0], shots)
            support_tokens = as_episodes(hidden_states[:n], shots)
            hidden_states = torch.cat([hidden_states[:n], self.read_support(hidden_states[n:], support_tokens)])
        elif bank is not None and mode == "write":
            bank.put(self.sii_name, (hidden_states,), shots)
        elif bank is not None and mode == "read":
            (support_tokens,) = bank.get(self.sii_name, None)
            hidden_states = self.read_support(hidden_states, support_tokens)
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                self.norm2(hidden_states),
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **kwargs,
            )
        return hidden_states + self.ff(self.norm3(hidden_states))

    def read_support(self, query_tokens: torch.Tensor, support_tokens: torch.Tensor) -> torch.Tensor:
        """SII: ``(B, N, C)`` query tokens + ``CAttn_s(LN_s h, LN_s z_s)`` over ``(B or 1, M, C)``
        support tokens (batch 1: one support shared by many query slices, its keys and values
        projected once)."""
        support_tokens = self.sii_norm(support_tokens.to(query_tokens.dtype))
        return query_tokens + multi_head_attention(
            self.sii_attn,
            self.sii_attn.to_q(self.sii_norm(query_tokens)),
            self.sii_attn.to_k(support_tokens),
            self.sii_attn.to_v(support_tokens),
        )


def transformer_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """Every ``BasicTransformerBlock`` of ``unet`` with its module name, in module order."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def install_support_attention(unet: nn.Module, form: SupportAttentionForm) -> list[str]:
    """Make ``unet`` support-aware in place; returns the bank keys (one per block).

    Every attention gets an SDPA processor that accepts the bank arguments; with
    ``kv_concat`` the blocks' self-attentions read/write K/V, with ``cross_attention`` every
    block becomes a :class:`SupportCrossAttentionBlock`.
    """
    if form not in SUPPORT_ATTENTION_FORMS:
        raise ValueError(f"unknown support-attention form {form!r}; known: {SUPPORT_ATTENTION_FORMS}")
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ValueError("the U-Net has no BasicTransformerBlock to make support-aware")
    for name, block in blocks:
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention:
            raise ValueError(f"block {name} is not a plain Stable Diffusion transformer block")
        if form == "cross_attention":
            block.__class__ = SupportCrossAttentionBlock
            block.add_support_attention(name)
    # Every Attention (incl. the new ones) gets a processor accepting the bank kwargs, so
    # diffusers never warns about (and drops) them.
    self_attention = {f"{name}.attn1": name for name, _ in blocks}
    for module_name, module in unet.named_modules():
        if isinstance(module, Attention):
            if form == "kv_concat" and module_name in self_attention:
                module.set_processor(KVBankSelfAttnProcessor(self_attention[module_name]))
            else:
                module.set_processor(PlainAttnProcessor())
    return [name for name, _ in blocks]


def support_attention_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The parameters added by the ``cross_attention`` form (empty for ``kv_concat``)."""
    params: list[nn.Parameter] = []
    for _, block in transformer_blocks(unet):
        if isinstance(block, SupportCrossAttentionBlock):
            params += list(block.sii_norm.parameters()) + list(block.sii_attn.parameters())
    return params

"""BERT for pretraining, sequence classification, token classification and question answering, in one file.

Module and parameter names match `transformers`' `BertForPreTraining`, so checkpoints convert by name. Three
speed tricks over the textbook computation, each switchable and tested against the plain path:

- unpadded execution: padding tokens are dropped before the embeddings, so embeddings, projections, FFN and
  LayerNorm run on real tokens only (`BertConfig.unpad`);
- variable-length attention over those tokens, confined to each sequence, or to each document of a packed
  sequence (`bertscale.model.attention`: FlashAttention-2's varlen kernel on CUDA, length-bucketed
  `scaled_dot_product_attention` elsewhere; `BertConfig.attention`);
- the MLM head (a hidden x vocab projection, the largest matmul of a small BERT) runs only at masked positions.

The attention mask is HF's (1 = token, 0 = padding), or, for packed sequences, the document number of each token
(1, 2, ...; 0 = padding): tokens attend only to tokens of their own document. bf16 autocast is the caller's
business; losses are always computed in fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.errors import ConfigError
from bertscale.model.attention import BACKENDS, Segments, varlen_attention
from bertscale.model.dropout import Dropout

# HF's activation names; "gelu" is the exact erf form BERT was trained with.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# Named sizes (litgpt-style registry): layers, hidden, heads, FFN.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}


@dataclass
class BertConfig:
    """Architecture hyper-parameters, with Hugging Face's field names (BERT-base defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Execution options, not architecture fields (never exported): drop padding tokens inside the model, and
    # the attention kernel over them (auto: FlashAttention-2 varlen where it can run, else bucketed SDPA).
    unpad: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: choose a head count that divides the hidden size"
            )
        if self.attention not in BACKENDS:
            raise ConfigError(f"attention={self.attention!r} is not supported; use one of {', '.join(BACKENDS)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_name(cls, size: str, **overrides) -> "BertConfig":
        """A named size (tiny, mini, small, medium, base, large) with field overrides."""
        if size not in SIZES:
            raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
        return cls(**{**SIZES[size], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The fields that define the weights (what HF's config.json holds): no execution options."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_OPTIONS}

    @classmethod
    def from_dict(cls, data: dict) -> "BertConfig":
        """Build from a dict such as HF's config.json; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


EXECUTION_OPTIONS = ("unpad", "attention")


# ----------------------------------------------------------------------------------------------------------------
# Unpadding
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Padding:
    """Where the kept tokens of a padded [B, T] batch live, to move activations between [N, C] and [B, T, C], and
    the attention segments they form (one per sequence, or per document of a packed sequence)."""

    indices: Tensor  # [N] positions of the kept tokens in the flattened [B*T] grid, ascending
    starts: Tensor  # [B] packed index of each sequence's first token (its [CLS])
    batch: int
    seqlen: int
    segments: Segments

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> "Padding":
        keep = attention_mask.bool().clone()
        # Column 0 is kept even if masked so that the pooler reads the same token as the padded model does.
        keep[:, 0] = True
        counts = keep.sum(1)
        indices = keep.flatten().nonzero().squeeze(1)
        # A segment is a run of kept tokens with one (row, document) pair: a new one starts where either changes.
        b, t = attention_mask.shape
        key = (indices // t) * (int(attention_mask.max()) + 1) + attention_mask.flatten().index_select(0, indices)
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        bounds = torch.cat([first.nonzero().squeeze(1), key.new_tensor([len(key)])])
        return cls(indices, counts.cumsum(0) - counts, b, t, Segments.from_lengths(bounds.diff()))

    def unpad(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices)

    def repad(self, x: Tensor) -> Tensor:
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:])
        return out.index_copy(0, self.indices, x).view(self.batch, self.seqlen, *x.shape[1:])

    def packed_rows(self, grid_positions: Tensor) -> Tensor:
        """Map positions in the [B*T] grid to rows of the packed [N, C] activations."""
        lookup = torch.full((self.batch * self.seqlen,), -1, dtype=torch.long, device=self.indices.device)
        lookup[self.indices] = torch.arange(len(self.indices), device=self.indices.device)
        rows = lookup[grid_positions]
        if bool((rows < 0).any()):
            raise ValueError("masked_positions point at padding tokens (attention_mask == 0)")
        return rows


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        # Any leading shape: [B, T] for the padded path, [N] for packed tokens.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.backend = config.attention

    def forward(self, x: Tensor, key_mask: Tensor | None, padding: Padding | None) -> Tensor:
        # One [C, 3C] product instead of three (the weights keep HF's names; concatenating them is cheap next to
        # the product over all tokens).
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(x, weight, bias)
        dropout_p = self.dropout_p if self.training else 0.0
        if padding is not None:  # packed real tokens [N, 3C]
            qkv = qkv.view(qkv.shape[0], 3, self.num_heads, -1)
            return varlen_attention(qkv, padding.segments, dropout_p, self.backend)
        b, t, _ = qkv.shape
        q, k, v = qkv.view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(b, t, -1)


def padded_attention_mask(attention_mask: Tensor) -> Tensor:
    """The boolean SDPA mask of the padded path: [B, 1, 1, T] over keys for an HF mask; for document numbers,
    [B, 1, T, T], true where query and key share a document (padding queries see every real token)."""
    if int(attention_mask.max()) <= 1:
        return attention_mask.bool()[:, None, None, :]
    q, k = attention_mask[:, :, None], attention_mask[:, None, :]
    return (((q == k) | (q == 0)) & (k > 0))[:, None]


class BertSelfOutput(nn.Module):
    """Projection, dropout, residual and post-LayerNorm; also the FFN's second half (`BertOutput`)."""

    def __init__(self, config: BertConfig, in_features: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, key_mask: Tensor | None, padding: Padding | None) -> Tensor:
        return self.output(self.self(x, key_mask, padding), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, key_mask: Tensor | None, padding: Padding | None) -> Tensor:
        x = self.attention(x, key_mask, padding)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, key_mask: Tensor | None, padding: Padding | None) -> Tensor:
        for layer in self.layer:
            x = layer(x, key_mask, padding)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, cls_hidden: Tensor) -> Tensor:
        return self.activation(self.dense(cls_hidden))


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) for Linear and Embedding, zero biases and padding row, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertPreTrainedModel(nn.Module):
    """Shared by the models below: the config and BERT's initialisation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config

    @torch.no_grad()
    def init_weights(self) -> None:
        self.apply(lambda m: init_bert_weights(m, self.config.initializer_range))
        for m in self.modules():
            if isinstance(m, BertLMPredictionHead):
                m.bias.zero_()


class BertModel(BertPreTrainedModel):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        if type(self) is BertModel:
            self.init_weights()

    def encode(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Padding | None, Tensor]:
        """Run the encoder. Returns (hidden, padding, cls_hidden): hidden is packed [N, H] when `padding` is
        set (the batch had padding and config.unpad is on), else [B, T, H]."""
        b, t = input_ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {t} > max_position_embeddings={self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        key_mask = None
        padding = None
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            if self.config.unpad:
                padding = Padding.from_mask(attention_mask)
            else:
                key_mask = padded_attention_mask(attention_mask)
        if padding is not None:
            pos = padding.indices % t
            x = self.embeddings(padding.unpad(input_ids), padding.unpad(token_type_ids), pos)
        else:
            x = self.embeddings(input_ids, token_type_ids, positions.expand(b, t))
        x = self.encoder(x, key_mask, padding)
        cls_hidden = x.index_select(0, padding.starts) if padding is not None else x[:, 0]
        return x, padding, cls_hidden

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(sequence_output [B, T, H] with zeros at padding when unpadded, pooled_output [B, H] or None)."""
        x, padding, cls_hidden = self.encode(input_ids, token_type_ids, attention_mask)
        sequence_output = padding.repad(x) if padding is not None else x
        pooled = self.pooler(cls_hidden) if self.pooler is not None else None
        return sequence_output, pooled


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------
class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder weight is tied to the word embeddings and its bias to `bias` (see BertForPreTraining).
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


@dataclass
class PretrainingOutput:
    """Losses (fp32 scalars), logits and accuracy counts (0-dim tensors: call .item() when logging)."""

    loss: Tensor | None
    mlm_loss: Tensor | None
    nsp_loss: Tensor | None
    mlm_logits: Tensor  # [M, V] at masked_positions, or [B, T, V] when no positions are given
    nsp_logits: Tensor  # [B, 2]
    mlm_correct: Tensor | None = None
    mlm_count: Tensor | None = None
    nsp_correct: Tensor | None = None
    nsp_count: Tensor | None = None


def _classification_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy over labels != -100 (0, not NaN, when there are none), #correct, #counted."""
    valid = labels != -100
    count = valid.sum()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") / count.clamp(min=1)
    # max(-1).indices, not argmax: the same index, ~3x faster over a [masked, vocab] bf16 matrix on CPU.
    correct = ((logits.detach().max(-1).indices == labels) & valid).sum()
    return loss, correct, count


class BertForPreTraining(BertPreTrainedModel):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the MLM decoder's weight with the word embeddings (and its bias with `predictions.bias`)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        masked_positions: Tensor | None = None,
        masked_labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
    ) -> PretrainingOutput:
        x, padding, cls_hidden = self.bert.encode(input_ids, token_type_ids, attention_mask)
        nsp_logits = self.cls.seq_relationship(self.bert.pooler(cls_hidden))
        if masked_positions is not None:
            # Only the masked rows go through the vocabulary projection: ~15% of the tokens, not all of them.
            rows = padding.packed_rows(masked_positions) if padding is not None else masked_positions
            mlm_logits = self.cls.predictions(x.reshape(-1, x.shape[-1]).index_select(0, rows))
        else:
            mlm_logits = self.cls.predictions(padding.repad(x) if padding is not None else x)
        out = PretrainingOutput(None, None, None, mlm_logits, nsp_logits)
        if masked_labels is not None:
            if masked_positions is None:
                raise ValueError("masked_labels need masked_positions")
            out.mlm_loss, out.mlm_correct, out.mlm_count = _classification_stats(mlm_logits, masked_labels)
        if next_sentence_label is not None:
            out.nsp_loss, out.nsp_correct, out.nsp_count = _classification_stats(nsp_logits, next_sentence_label)
        losses = [v for v in (out.mlm_loss, out.nsp_loss) if v is not None]
        out.loss = sum(losses[1:], losses[0]) if losses else None
        return out


class BertForSequenceClassification(BertPreTrainedModel):
    """Pooled [CLS] -> dropout -> linear; num_labels == 1 is regression (MSE), otherwise cross-entropy."""

    def __init__(self, config: BertConfig, num_labels: int = 2) -> None:
        super().__init__(config)
        if num_labels < 1:
            raise ConfigError(f"num_labels={num_labels}: use 1 for regression or >= 2 for classification")
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        _, padding, cls_hidden = self.bert.encode(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(self.bert.pooler(cls_hidden)))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return loss, logits


class BertForTokenClassification(BertPreTrainedModel):
    """Every token's hidden state -> dropout -> linear (HF's layout: no pooler). Cross-entropy over labels
    != -100, so only the positions that carry a label (a word's first sub-word) count."""

    def __init__(self, config: BertConfig, num_labels: int = 2) -> None:
        super().__init__(config)
        if num_labels < 2:
            raise ConfigError(f"num_labels={num_labels}: token classification needs at least 2 tags")
        self.num_labels = num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """(loss, logits [B, T, num_labels]); zeros at padding positions when the batch ran unpadded."""
        x, padding, _ = self.bert.encode(input_ids, token_type_ids, attention_mask)
        # The classifier runs on real tokens only; the loss too (padding carries -100 anyway).
        logits = self.classifier(self.dropout(x))
        loss = None
        if labels is not None:
            flat = padding.unpad(labels) if padding is not None else labels.reshape(-1)
            loss = _classification_stats(logits.reshape(-1, self.num_labels), flat)[0]
        return loss, padding.repad(logits) if padding is not None else logits


class BertForQuestionAnswering(BertPreTrainedModel):
    """Span extraction: every token's hidden state -> linear -> (start, end) logits (HF's layout: no pooler, no
    dropout). The loss is the mean of the start and end cross-entropies, positions clamped to the sequence
    length and ignored there, as HF computes it."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = 2
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """(loss, start_logits [B, T], end_logits [B, T]), logits in fp32."""
        x, padding, _ = self.bert.encode(input_ids, token_type_ids, attention_mask)
        logits = self.qa_outputs(x).float()
        if padding is not None:
            logits = padding.repad(logits)
        start_logits, end_logits = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start = F.cross_entropy(start_logits, start_positions.clamp(0, ignored), ignore_index=ignored)
            end = F.cross_entropy(end_logits, end_positions.clamp(0, ignored), ignore_index=ignored)
            loss = (start + end) / 2
        return loss, start_logits, end_logits


def compile_dense_blocks(model: nn.Module, dynamic: bool = True) -> int:
    """`torch.compile` every layer's dense blocks in place (the attention output and the FFN: projection, GELU,
    dropout, residual and LayerNorm fused), keeping parameter names, so that checkpoints, the HF export and
    resume see the same model. Attention itself stays outside the graphs: its segment layout changes with every
    batch. The token count is a dynamic dimension, so varying batch shapes reuse one graph. Returns the number of
    blocks compiled."""
    blocks = [m for m in model.modules() if isinstance(m, (BertSelfOutput, BertIntermediate))]
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())

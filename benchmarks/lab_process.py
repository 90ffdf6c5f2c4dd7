"""The synthetic lab's generative process, its tokenizer and its computable teacher (see `lab.py`).

Vocabulary (64 ids): 0 `<pad>`, 1 `<unk>`, 2 `<|im_start|>`, 3 `<|im_end|>`, 4 `user`, 5 `assistant`,
6-21 digits `d0`-`d15`, 22-37 fillers `f0`-`f15`, 38-63 unused words `u0`-`u25`.

A conversation is ``<|im_start|> user a1 a2 a3 a4 <|im_end|> <|im_start|> assistant y1 h1 y2 h2 y3 h3 y4 h4
<|im_end|>`` (the chat template of `speckd_trl.tools.testing`):

- the prompt `a1..a4`: four digits drawn uniformly (16^4 = 65536 prompts; train, validation and test prompts are
  disjoint);
- answer slot `k = 0, 2, 4, 6` (deterministic): ``y_i = d[PERM[a_i]]``, a fixed permutation of the i-th prompt digit:
  entropy 0;
- answer slot `k = 1, 3, 5, 7` (high entropy): a filler drawn from a Zipf law over the 16 fillers (probability
  proportional to 1 / (rank + 1), entropy 2.33 nats of the 2.77 maximum), rotated by the previous token's id, so
  the distribution depends on the context and can be learned;
- slot `k = 8`: `<|im_end|>` (deterministic).

`true_distribution` gives the exact next-token distribution at every answer position of any sequence (also of a
student's own, possibly malformed, on-policy samples: a slot's law depends only on the prompt, the slot index and
the previous token).

The teacher family (`OracleTeacher`): ``p_teacher = (1 - noise) * p_true + noise * r_ctx``, with `r_ctx` a
Dirichlet(0.3) distribution over the 32 content tokens (digits and fillers) picked by a hash of the context (prompt,
slot, previous token): the teacher's errors are idiosyncratic but consistent, like a model's. `noise=0` is the
exact process (the strongest teacher); larger `noise` blurs the high-entropy slots and, past about 0.5, flips the
argmax of some deterministic slots (a wrong teacher). `temperature` additionally sharpens (< 1) or flattens (> 1)
the teacher's distribution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from speckd_trl.tools.testing import word_level_tokenizer


PAD, UNK, IM_START, IM_END, USER, ASSISTANT = range(6)
N_DIGITS = N_FILLERS = 16
DIGIT0 = 6
FILLER0 = DIGIT0 + N_DIGITS  # 22
CONTENT = slice(DIGIT0, FILLER0 + N_FILLERS)  # ids 6..37
VOCAB_SIZE = 64
PROMPT_LEN = 4
ANSWER_LEN = 2 * PROMPT_LEN  # y1 h1 ... y4 h4, then <|im_end|>
DET_SLOTS = tuple(range(0, ANSWER_LEN, 2)) + (ANSWER_LEN,)  # the deterministic slots, end of turn included
PERM = [(7 * i + 3) % N_DIGITS for i in range(N_DIGITS)]  # a fixed permutation of the digits
ZIPF = torch.tensor([1.0 / (r + 1) for r in range(N_FILLERS)])
ZIPF = ZIPF / ZIPF.sum()
NOISE_ROWS = 8192  # rows of the teacher's noise table (indexed by a context hash)


def words() -> list[str]:
    out = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    out += [f"d{i}" for i in range(N_DIGITS)] + [f"f{i}" for i in range(N_FILLERS)]
    return out + [f"u{i}" for i in range(VOCAB_SIZE - len(out))]


def make_lab_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(words())


# Capacity-bound slots (`configure(hard_slots=...)`, `lab_capacity.py`): deterministic answer `i` of a hard slot is
# ``HARD_TABLE[a_i, a_{i+1 mod 4}]``, a fixed random table of the 256 digit pairs: a lookup that a student must
# memorize (1024 bits), learnable with enough capacity, beyond a small one. The teacher stays exact there.
HARD_TABLE = torch.randint(0, N_DIGITS, (N_DIGITS, N_DIGITS), generator=torch.Generator().manual_seed(4321)).tolist()
HARD_SLOTS: tuple[int, ...] = ()  # indices 0..3 of the deterministic answers that are hard (none by default)


def configure(hard_slots: tuple[int, ...] = ()) -> None:
    """Make the deterministic answers `hard_slots` (0..3) capacity-bound lookups for this process (both the data and
    the teacher read it)."""
    global HARD_SLOTS
    if any(not 0 <= i < PROMPT_LEN for i in hard_slots):
        raise ValueError(f"hard_slots={hard_slots}: each must be in 0..{PROMPT_LEN - 1}")
    HARD_SLOTS = tuple(sorted(set(hard_slots)))


def deterministic_answer(prompt: list[int]) -> list[int]:
    """Token ids of y1..y4 for a prompt of four digits (0..15)."""
    return [
        DIGIT0 + (HARD_TABLE[a][prompt[(i + 1) % PROMPT_LEN]] if i in HARD_SLOTS else PERM[a])
        for i, a in enumerate(prompt)
    ]


def filler_distribution(prev_token: int) -> torch.Tensor:
    """[V] law of a high-entropy slot after `prev_token`: the Zipf law over the fillers, rotated by the token id."""
    p = torch.zeros(VOCAB_SIZE)
    p[FILLER0 : FILLER0 + N_FILLERS] = torch.roll(ZIPF, prev_token % N_FILLERS)
    return p


def slot_distribution(prompt: list[int], slot: int, prev_token: int) -> torch.Tensor:
    """[V] true law of answer slot `slot` (0-based; 8 is the end of turn; later slots: end of turn too)."""
    if slot >= ANSWER_LEN:
        p = torch.zeros(VOCAB_SIZE)
        p[IM_END] = 1.0
        return p
    if slot % 2 == 0:
        p = torch.zeros(VOCAB_SIZE)
        p[deterministic_answer(prompt)[slot // 2]] = 1.0
        return p
    return filler_distribution(prev_token)


def sample_answer(prompt: list[int], rng: random.Random) -> list[int]:
    ids = []
    for slot in range(ANSWER_LEN):
        prev = ids[-1] if ids else ASSISTANT
        p = slot_distribution(prompt, slot, prev)
        ids.append(rng.choices(range(VOCAB_SIZE), weights=p.tolist())[0])
    return ids


def text(ids: list[int]) -> str:
    vocab = words()
    return " ".join(vocab[i] for i in ids)


@dataclass
class Splits:
    train: list[list[int]]
    validation: list[list[int]]
    test: list[list[int]]


def make_splits(n_train: int, n_validation: int, n_test: int, seed: int = 0) -> Splits:
    """Disjoint prompt sets (four digits each), from one seeded draw without replacement."""
    rng = random.Random(seed)
    codes = rng.sample(range(N_DIGITS**PROMPT_LEN), n_train + n_validation + n_test)
    prompts = [[(c >> (4 * i)) & 15 for i in range(PROMPT_LEN)] for c in codes]
    return Splits(prompts[:n_train], prompts[n_train : n_train + n_validation], prompts[n_train + n_validation :])


def chat_rows(prompts: list[list[int]], seed: int) -> list[dict]:
    """`{"messages": [user, assistant]}` rows, the answer sampled from the true process."""
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": text([DIGIT0 + a for a in prompt])},
                {"role": "assistant", "content": text(sample_answer(prompt, rng))},
            ]
        }
        for prompt in prompts
    ]


def prompt_ids(prompt: list[int]) -> list[int]:
    """The tokenized generation prompt: ``<|im_start|> user a1..a4 <|im_end|> <|im_start|> assistant``."""
    return [IM_START, USER] + [DIGIT0 + a for a in prompt] + [IM_END, IM_START, ASSISTANT]


def answer_start(row: list[int]) -> tuple[list[int], int] | None:
    """The prompt digits of a tokenized row and the index of its `assistant` token (the answer follows it)."""
    try:
        u = row.index(USER)
        s = row.index(ASSISTANT, u + 1)
    except ValueError:
        return None
    prompt = [t - DIGIT0 for t in row[u + 1 : u + 1 + PROMPT_LEN]]
    if len(prompt) < PROMPT_LEN or any(not 0 <= a < N_DIGITS for a in prompt):
        return None
    return prompt, s


def true_distributions(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The true next-token law at every position `[B, T, V]` and each position's answer slot `[B, T]` (-1 before
    the answer: those positions get a uniform law and are never trained on)."""
    batch, length = input_ids.shape
    probs = torch.full((batch, length, VOCAB_SIZE), 1.0 / VOCAB_SIZE)
    slots = torch.full((batch, length), -1, dtype=torch.long)
    for b, row in enumerate(input_ids.tolist()):
        found = answer_start(row)
        if found is None:
            continue
        prompt, s = found
        for j in range(s, length):
            slot = j - s
            probs[b, j] = slot_distribution(prompt, slot, row[j])
            slots[b, j] = slot
    return probs, slots


def context_hash(input_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B, T] row of the noise table for each position: a hash of (prompt, slot, previous token)."""
    batch, length = input_ids.shape
    out = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(input_ids.tolist()):
        found = answer_start(row)
        if found is None:
            continue
        prompt, s = found
        code = sum(a << (4 * i) for i, a in enumerate(prompt))
        for j in range(s, length):
            key = (code * 131 + (j - s)) * 97 + row[j]
            out[b, j] = (key * 2654435761) % (2**32) % NOISE_ROWS
    return out


TEACHER_MODES = ("mix", "flip")
FLIP_MASS = 0.9  # "flip" mode: mass on the wrong token at a flipped position


class OracleTeacherConfig(PretrainedConfig):
    model_type = "speckd_lab_oracle"

    def __init__(self, vocab_size: int = VOCAB_SIZE, noise: float = 0.0, temperature: float = 1.0,
                 noise_seed: int = 1234, mode: str = "mix", **kwargs):  # fmt: skip
        if mode not in TEACHER_MODES:
            raise ValueError(f"OracleTeacherConfig: mode={mode!r}; choose from {TEACHER_MODES}")
        self.vocab_size = vocab_size
        self.mode = mode
        self.noise = noise
        self.temperature = temperature
        self.noise_seed = noise_seed
        self.num_hidden_layers = 1  # one cache layer: the token ids seen so far (`OracleTeacher.forward`)
        super().__init__(**kwargs)


class OracleTeacher(PreTrainedModel):
    """A teacher whose next-token law is computed from the known process, then raised to ``1 / temperature`` and
    renormalized. `mode="mix"`: ``(1 - noise) * p_true + noise * r_ctx`` at every answer position (error spread
    inside every distribution). `mode="flip"`: at a share `noise` of the contexts (chosen by the context hash) the
    teacher is confidently wrong, ``0.9 * onehot(argmax r_ctx) + 0.1 * p_true``, and exact elsewhere (position-level
    errors: the "noisy teacher tokens" a position gate could filter). Counts its forward passes (`forwards`) and the sequences it
    scored (`rows`)."""

    config_class = OracleTeacherConfig
    base_model_prefix = "oracle"
    _no_split_modules: list[str] = []

    def __init__(self, config: OracleTeacherConfig):
        super().__init__(config)
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device / dtype anchor
        with torch.random.fork_rng():  # a table fixed by `noise_seed`, whatever the global RNG state
            torch.manual_seed(config.noise_seed)
            gamma = torch._standard_gamma(torch.full((NOISE_ROWS, N_DIGITS + N_FILLERS), 0.3))
            flip_u = torch.rand(NOISE_ROWS)  # drawn after the table: "mix" teachers are unchanged by it
        table = torch.zeros(NOISE_ROWS, VOCAB_SIZE)
        table[:, CONTENT] = gamma / gamma.sum(-1, keepdim=True)
        self.register_buffer("noise_table", table, persistent=False)
        self.register_buffer("flip_u", flip_u, persistent=False)
        self.forwards = 0
        self.rows = 0
        self.post_init()

    def _init_weights(self, module):  # nothing to initialize
        pass

    def get_output_embeddings(self):
        return None

    def probabilities(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.cpu()
        p_true, slots = true_distributions(ids)
        noise = self.config.noise
        p = p_true
        if noise > 0:
            rows = context_hash(ids, slots)
            r = self.noise_table[rows]
            answer = (slots >= 0).unsqueeze(-1)
            if self.config.mode == "mix":
                p = torch.where(answer, (1 - noise) * p_true + noise * r, p_true)
            else:
                wrong = torch.nn.functional.one_hot(r.argmax(-1), VOCAB_SIZE).float()
                flipped = answer & (self.flip_u[rows] < noise).unsqueeze(-1)
                p = torch.where(flipped, FLIP_MASS * wrong + (1 - FLIP_MASS) * p_true, p_true)
        if self.config.temperature != 1.0:
            p = p.clamp_min(1e-12) ** (1.0 / self.config.temperature)
            p = p / p.sum(-1, keepdim=True)
        return p

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        self.forwards += 1
        self.rows += int(input_ids.shape[0])
        ids = input_ids
        if past_key_values is not None:  # incremental calls (SKD generation): the cache keeps the ids seen so far as
            seen = input_ids.to(torch.float32)[:, None, :, None]  # its keys, so it is cropped with rejected drafts
            keys, _ = past_key_values.update(seen, seen, 0)
            ids = keys[:, 0, :, 0].round().long()
        p = self.probabilities(ids)[:, -input_ids.shape[1] :]
        p = 0.9999 * p + 0.0001 / VOCAB_SIZE  # finite logits everywhere
        logits = p.log().to(device=input_ids.device, dtype=self.dummy.dtype)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

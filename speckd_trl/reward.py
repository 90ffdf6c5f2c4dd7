"""The teacher's verdict as a reward function for TRL's RL trainers (`GRPOTrainer`'s ``reward_funcs``).

`TeacherAcceptanceReward` scores each sampled completion by the share of its tokens that the teacher accepts under a
gate rule (`rules.py`), the same verdict that `SpecKDTrainer` logs as its binary reward and trains with
``reward_coef > 0``. It follows TRL's reward-function contract: it is called with the keyword arguments ``prompts``,
``completions`` and ``completion_ids`` (plus the dataset's other columns and the trainer's extras, ignored here) and
returns one float per completion; TRL logs it as ``rewards/<__name__>/mean``.

Shapes: ``N`` completions, ``L`` the longest prompt plus completion, ``V`` the teacher's vocabulary, ``M`` the total
number of completion tokens in the batch.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .data import is_conversational
from .models import load_teacher, load_teacher_tokenizer
from .rules import GateRule, get_rule, uniform
from .validation import check_4bit_teacher, check_covers_tokenizer, check_same_tokens


# The reward of an empty completion (no token for the teacher to verify): see `TeacherAcceptanceReward`.
EMPTY_COMPLETION_REWARD = 0.0


class TeacherAcceptanceReward:
    """A TRL reward function: the teacher's acceptance rate of each completion's tokens under a gate rule.

    For a completion ``x_1 .. x_C`` sampled after a prompt of ``P`` tokens, the proposal at completion position ``t``
    is the sampled token ``x_t`` and the teacher verifies it with its logits at the previous position (``P + t - 2``,
    0-based, in the concatenated sequence: the teacher's next-token distribution after the prompt and ``x_1 ..
    x_{t-1}``). The reward is ``(number of accepted tokens) / C``, in ``[0, 1]``. One teacher forward, under
    `torch.no_grad()` on the teacher's device, scores the whole batch of completions.

    The prompt is re-tokenized as `GRPOTrainer` tokenizes it for generation: a conversational prompt (a list of
    ``{"role", "content"}`` messages) through the tokenizer's chat template with ``add_generation_prompt=True``, a
    plain prompt as text with the tokenizer's default special tokens. The completion is taken as the policy's own
    token ids (``completion_ids``), never re-tokenized from text.

    The teacher ranks the tokenizer's ids only, as `SpecKDTrainer` compares them: a teacher whose embedding is padded
    past the tokenizer (Qwen) has logits for ids no token reaches, and they are cut off before the verdict (a sampled
    padding id, which is no token, is rejected).

    Rules: any rule of `rules.GATE_RULES` that reads only the teacher (``topk``, with ``top_k``). A rule that reads the
    student's probabilities (``spec``) is refused: TRL's reward contract passes the sampled ids, not the policy's
    probabilities of them, so ``min(1, p/q)`` cannot be computed. A rule that never rejects (``none``) is refused too:
    its reward would be 1 for every completion, a constant with no signal.

    An empty completion (no token) gets `EMPTY_COMPLETION_REWARD` (0.0) by default, ``empty_reward``: nothing was
    proposed, so nothing was accepted. Pass ``empty_reward=None`` to return None instead, which TRL treats as a
    missing reward (NaN, left out of the logged mean).

    Args:
        teacher (`nn.Module` or `str`): the teacher, a loaded causal LM or a hub id / local directory (loaded with
            `models.load_teacher`, in 4-bit NF4 with ``load_in_4bit=True``).
        tokenizer: the policy's tokenizer (`GRPOTrainer`'s ``processing_class``), which produced ``completion_ids``.
            The teacher must cover its ids (and, when the teacher comes with its own tokenizer, agree with it id by
            id).
        gate (`str`): the rule's name (``"topk"``; see `rules.get_rule`).
        top_k (`int`): ``k`` of a rule that reads it; must be below the teacher's vocabulary size.
        load_in_4bit (`bool`): load a teacher given as a name or path in 4-bit (bitsandbytes NF4, double
            quantization), placed on ``device``.
        device (`str` or `torch.device`, *optional*): where a teacher given by name is loaded (default ``"cpu"``, or
            ``"cuda"`` when available). A loaded teacher stays where it is.
        teacher_model_init_kwargs (`dict`, *optional*): further `from_pretrained` arguments for a teacher by name.
        chat_template_kwargs (`dict`, *optional*): extra arguments of `apply_chat_template` (as `GRPOConfig`'s
            ``chat_template_kwargs``; pass the same ones).
        empty_reward (`float` or `None`): the reward of an empty completion.
        name (`str`): the function's `__name__`, under which TRL logs it (``rewards/<name>/mean``).
        generator (`torch.Generator`, *optional*): source of the uniforms of a rule that draws them.
    """

    def __init__(
        self,
        teacher: nn.Module | str,
        tokenizer: Any,
        *,
        gate: str = "topk",
        top_k: int = 5,
        load_in_4bit: bool = False,
        device: str | torch.device | None = None,
        teacher_model_init_kwargs: dict[str, Any] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        empty_reward: float | None = EMPTY_COMPLETION_REWARD,
        name: str = "teacher_acceptance",
        generator: torch.Generator | None = None,
    ) -> None:
        self.rule: GateRule = get_rule(gate, owner="TeacherAcceptanceReward")
        if self.rule.reads_student:
            raise ValueError(
                f"TeacherAcceptanceReward: gate={gate!r} reads the policy's probability q(x_t) of each sampled token, "
                "but TRL's reward functions receive only the sampled token ids (prompts, completions, "
                "completion_ids), not the policy's probabilities, so the verdict cannot be computed. Use "
                "gate='topk' (with top_k), which reads the teacher alone."
            )
        if not self.rule.rejects:
            raise ValueError(
                f"TeacherAcceptanceReward: gate={gate!r} accepts every token, so every completion would get reward "
                "1.0: a constant with no signal for GRPO. Use gate='topk' (with top_k)."
            )
        self.__name__ = name
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.processing_class = tokenizer
        self.top_k = top_k
        self.empty_reward = empty_reward
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.generator = generator

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        quantization = "nf4" if load_in_4bit else "none"  # `models.load_teacher` reads the resolved method
        loading = SimpleNamespace(
            teacher_model_init_kwargs=teacher_model_init_kwargs,
            trust_remote_code=False,
            teacher_quantization=quantization,
            teacher_quantization_method=quantization,
            teacher_quantization_skip_modules=None,
            teacher_load_in_4bit=load_in_4bit,
            teacher_bnb_4bit_quant_type="nf4",
            teacher_bnb_4bit_compute_dtype="auto",
            teacher_bnb_4bit_use_double_quant=True,
            bf16=False,
            fp16=False,
            device=torch.device(device),
        )
        teacher_tokenizer = load_teacher_tokenizer(teacher, loading)
        if isinstance(teacher, str):
            if load_in_4bit:
                check_4bit_teacher(device)
            teacher = load_teacher(teacher, loading)
            if not load_in_4bit:
                teacher = teacher.to(device)
        elif load_in_4bit:
            raise ValueError(
                "TeacherAcceptanceReward: load_in_4bit=True loads a teacher given as a name or path, but a loaded "
                f"{type(teacher).__name__} was passed; pass its name or path, or load it in 4-bit yourself."
            )
        self.teacher: nn.Module = teacher.eval()
        self._check_vocab(teacher_tokenizer)

    def _check_vocab(self, teacher_tokenizer: Any) -> None:
        """Raise if the teacher cannot verify the policy tokenizer's ids: another tokenizer, too few logits, or a k
        that accepts everything."""
        if teacher_tokenizer is not None:
            check_same_tokens(self.tokenizer, getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer))
        self.vocab_size = check_covers_tokenizer(self.teacher, "teacher", self.tokenizer)
        self.ranked_size = n_ranked = len(self.tokenizer)  # the ids the teacher ranks (padding rows cut off)
        if self.rule.uses_top_k and not 1 <= self.top_k < n_ranked:
            raise ValueError(
                f"TeacherAcceptanceReward: top_k={self.top_k} must be >= 1 and below the tokenizer's vocabulary size "
                f"{n_ranked} (with k >= {n_ranked} every token is accepted)."
            )

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def prompt_ids(self, prompts: list[Any]) -> list[list[int]]:
        """The prompts' token ids as `GRPOTrainer` tokenizes them for generation (one list per prompt)."""
        if is_conversational(prompts[0]):
            if getattr(self.processing_class, "chat_template", None) is None:
                raise ValueError(
                    "TeacherAcceptanceReward: the prompts are chat messages, but the tokenizer "
                    f"{type(self.processing_class).__name__} has no chat template (chat_template is None), so they "
                    "cannot be tokenized as the policy saw them. Pass the chat model's tokenizer (the one given to "
                    "GRPOTrainer as processing_class) or set `tokenizer.chat_template`."
                )
            tokenized = self.processing_class.apply_chat_template(
                conversation=prompts,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **self.chat_template_kwargs,
            )
            return [list(ids) for ids in tokenized["input_ids"]]
        return [list(ids) for ids in self.processing_class(text=list(prompts))["input_ids"]]

    @torch.no_grad()
    def accepted(self, prompts: list[Any], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """The teacher's verdict on every completion token.

        Args:
            prompts (`list`): ``N`` prompts, text or chat messages (all of one kind, as in a GRPO batch).
            completion_ids (`list[list[int]]`): the ``N`` sampled completions' token ids (lengths ``C_i``).

        Returns:
            `list` of ``N`` `torch.BoolTensor`, of shape `[C_i]` each (on the CPU).
        """
        prompt_ids = self.prompt_ids(prompts)
        rows = [i for i, ids in enumerate(completion_ids) if len(ids) > 0]
        verdicts = [torch.zeros(0, dtype=torch.bool) for _ in completion_ids]
        if not rows:
            return verdicts
        for i in rows:
            if not prompt_ids[i]:
                raise ValueError(
                    f"TeacherAcceptanceReward: prompt {i} tokenizes to no token, so the teacher has no position to "
                    "verify the completion's first token from."
                )
        n_teacher = self.vocab_size
        sequences = [prompt_ids[i] + list(completion_ids[i]) for i in rows]
        if max(max(seq) for seq in sequences) >= n_teacher:
            raise ValueError(
                f"TeacherAcceptanceReward: a token id is >= the teacher's vocabulary size {n_teacher}: the completions "
                "were not produced with the tokenizer the teacher was checked against."
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(seq) for seq in sequences)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        # [M] row and position of each completion token's verifying logits, and the token itself
        row_index, position, proposals = [], [], []
        for r, (i, seq) in enumerate(zip(rows, sequences, strict=True)):
            input_ids[r, : len(seq)] = torch.tensor(seq)
            attention_mask[r, : len(seq)] = 1
            n_prompt, n_completion = len(prompt_ids[i]), len(completion_ids[i])
            row_index += [r] * n_completion
            position += range(n_prompt - 1, n_prompt - 1 + n_completion)
            proposals += list(completion_ids[i])
        device = self.device
        # right padding: the real tokens keep positions 0..len-1, so no position ids are needed
        logits = self.teacher(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        # [M, V'] with V' the tokenizer's ids: the padding rows of a padded embedding are never ranked
        teacher_logits = logits[
            torch.tensor(row_index, device=device), torch.tensor(position, device=device), : self.ranked_size
        ]
        proposals_t = torch.tensor(proposals, device=device)  # [M]
        real = proposals_t < self.ranked_size  # a sampled padding id is no token: rejected
        uniforms = None
        if self.rule.draws_uniforms:
            uniforms = uniform(proposals_t.shape, device, self.generator)
        # the student's logits are never read: `reads_student` rules are refused at construction
        ranked = proposals_t.clamp(max=self.ranked_size - 1)
        verdict = self.rule.accept(teacher_logits, teacher_logits, ranked, top_k=self.top_k, uniforms=uniforms) & real
        verdict = verdict.cpu().split([len(completion_ids[i]) for i in rows])
        for i, v in zip(rows, verdict, strict=True):
            verdicts[i] = v
        return verdicts

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any] | None = None,
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """TRL's reward-function call: one reward per completion.

        Args:
            prompts (`list`): the ``N`` prompts (text, or lists of chat messages).
            completions (`list`, *optional*): the completions' text or messages (unused: the ids are scored).
            completion_ids (`list[list[int]]`): the ``N`` completions' sampled token ids.
            **kwargs: the dataset's other columns and the trainer's extras (``trainer_state``, ...), ignored.

        Returns:
            `list` of ``N`` floats in ``[0, 1]``: each completion's share of accepted tokens (``empty_reward`` for an
            empty completion).
        """
        if completion_ids is None:
            raise ValueError(
                "TeacherAcceptanceReward needs `completion_ids` (the sampled token ids), which TRL's GRPOTrainer "
                "passes to every reward function."
            )
        if len(prompts) != len(completion_ids):
            raise ValueError(
                f"TeacherAcceptanceReward: {len(prompts)} prompts but {len(completion_ids)} completions; pass one "
                "prompt per completion."
            )
        rewards: list[float | None] = []
        for verdict in self.accepted(prompts, completion_ids):
            if verdict.numel() == 0:
                rewards.append(self.empty_reward)
            else:
                rewards.append(verdict.float().mean().item())
        return rewards

    def __repr__(self) -> str:
        k = f", top_k={self.top_k}" if self.rule.uses_top_k else ""
        return f"TeacherAcceptanceReward(gate={self.rule.name!r}{k}, name={self.__name__!r})"


__all__ = ["EMPTY_COMPLETION_REWARD", "TeacherAcceptanceReward"]

"""Render a dataset row as a chat with the tokenizer's own template, and tokenize it for completion-only loss."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from job.errors import ConfigError

INSTRUCTION = (
    "You write SQL. Given the database schema and a question, reply with the SQL query that answers the "
    "question, and nothing else."
)

# End-of-turn markers of common chat templates; generation stops at these and at the EOS token.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


SHIPPED_TEMPLATES = ("gemma", "chatml")
"""Chat templates shipped in job/resources/chat_templates/, for base models whose tokenizer has none."""


def chat_template_text(name_or_path: str) -> str:
    """The Jinja text of a shipped template (`gemma`, `chatml`) or of a template file."""
    if name_or_path in SHIPPED_TEMPLATES:
        return (resources.files("job.resources") / "chat_templates" / f"{name_or_path}.jinja").read_text()
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.chat_template {name_or_path}: neither a shipped template ({', '.join(SHIPPED_TEMPLATES)}) "
            "nor a file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model.chat_template {name_or_path}: cannot read it ({type(exc).__name__})") from None


def ensure_chat_template(tokenizer: Any, name_or_path: str | None) -> None:
    """Give `tokenizer` the configured template when it has none of its own (a base model)."""
    if name_or_path and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template_text(name_or_path)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """-100 on the prompt; the answer's ids up to and including its end-of-turn/EOS token."""
    prompt_len: int


def supports_system_role(tokenizer: Any) -> bool:
    """True when the chat template renders a system turn (Gemma's raises on one, some drop it silently)."""
    probe = "SYSTEM-ROLE-PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:
        return False
    return probe in text


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus every end-of-turn marker that the vocabulary holds as a single token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(ids)


class ChatFormatter:
    """Turns rows into prompts (for generation) and tokenized training examples, with one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "model.name: the tokenizer has no chat template; use an instruction-tuned (chat) model, or set "
                f"model.chat_template to one of {', '.join(SHIPPED_TEMPLATES)} or a Jinja file"
            )
        self.tokenizer = tokenizer
        self.system_role = supports_system_role(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer)

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The conversation up to the answer; the instruction joins the user turn when there is no system role."""
        body = f"Schema:\n{row['sql_context'].strip()}\n\nQuestion: {row['sql_prompt'].strip()}"
        if self.system_role:
            return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": body}]
        return [{"role": "user", "content": f"{INSTRUCTION}\n\n{body}"}]

    def prompt(self, row: dict[str, Any]) -> str:
        """The text the model sees at inference: the conversation plus the template's generation prompt."""
        return self.tokenizer.apply_chat_template(self.messages(row), tokenize=False, add_generation_prompt=True)

    def tokenize(self, row: dict[str, Any]) -> TokenizedExample:
        return self.tokenize_many([row])[0]

    def tokenize_many(self, rows: list[dict[str, Any]]) -> list[TokenizedExample]:
        """Prompt and answer token ids, with the loss on the answer and its end-of-turn token only.

        The prompt is tokenized on its own, exactly as at inference. The answer runs up to and including the
        first end-of-turn/EOS token (anything the template puts after it is dropped); a template that closes the
        assistant turn without one gets EOS appended, so the model learns to stop. Rows are tokenized in one
        batch call per part (the tokenizer's Rust side parallelizes it).

        Why not trl's conversational prompt/completion rows with `completion_only_loss` (checked against trl 1.16):
        it tokenizes prompt+completion as one string and starts the loss where that diverges from the prompt
        tokenized alone, so a merge across the boundary trains on a context the model never sees at inference;
        it trains whatever the template puts after the end-of-turn token (Gemma's and ChatML's trailing "\n");
        and it truncates rows to `max_length` (or keeps them whole with `max_length=None`) inside the trainer,
        after the data stage, instead of dropping and counting them where `finetune prepare` reports. trl takes
        these ids and labels as they are (a dataset with `input_ids` is not tokenized again; tests/test_loss.py
        checks the batches its dataloader yields).
        """
        prompts, answers = [], []
        for row in rows:
            messages = self.messages(row)
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": row["sql"].strip()}], tokenize=False
            )
            if not full.startswith(prompt):
                raise ConfigError("model.name: the chat template renders the prompt differently once an answer follows")
            prompts.append(prompt)
            answers.append(full[len(prompt) :])
        if not rows:
            return []
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
        return [self._example(p, a) for p, a in zip(prompt_ids, answer_ids, strict=True)]

    def _example(self, prompt_ids: list[int], answer_ids: list[int]) -> TokenizedExample:
        stop_at = next((i for i, token in enumerate(answer_ids) if token in self.stop_ids), None)
        answer_ids = [*answer_ids, self.tokenizer.eos_token_id] if stop_at is None else answer_ids[: stop_at + 1]
        return TokenizedExample(
            input_ids=prompt_ids + answer_ids,
            labels=[-100] * len(prompt_ids) + answer_ids,
            prompt_len=len(prompt_ids),
        )

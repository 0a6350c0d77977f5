"""Chat prompts from a folder's Hugging Face chat template (tokenizer_config.json "chat_template"), rendered
with jinja2 as transformers renders them (trim_blocks, lstrip_blocks; `{% generation %}` blocks, which
transformers uses to mark assistant tokens, render their body). Torch-free: apps and the runtime use it."""
from __future__ import annotations

from typing import Any

from edgeloop.io import cause


def _environment():
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: the body, unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    return env


def special(tc: dict, key: str) -> str:
    """A special token of tokenizer_config.json (a string, or an AddedToken dict's "content")."""
    v = tc.get(key)
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def render(tokenizer_config: dict[str, Any], messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` ([{"role", "content"}]) under the folder's chat template."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str) or not template:
        raise ValueError("--chat: this folder's tokenizer_config.json has no chat_template")
    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=special(tokenizer_config, "bos_token"),
            eos_token=special(tokenizer_config, "eos_token"))
    except ValueError:
        raise
    except Exception as e:  # jinja2's template errors
        raise ValueError(f"chat template: cannot be rendered ({type(e).__name__}: {cause(e)})") from None


def prompt_ids(tokenizer, folder, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids: the text as it is, or (chat) one user message under the folder's template."""
    from pathlib import Path

    from edgeloop.io import read_json_object

    if chat:
        f = Path(folder) / "tokenizer_config.json"
        tc = read_json_object(f) if f.exists() else {}
        prompt = render(tc, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt, add_special_tokens=False).ids

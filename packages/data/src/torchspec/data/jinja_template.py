"""Export a registry ``ChatTemplate`` as a Jinja ``chat_template`` that renders the same text.

Used by ``build_local_tokenizer`` so locally built tokenizers work in ``"hf"`` mode, and handy for giving
a base model's tokenizer the chat format of its instruct sibling.
"""

from __future__ import annotations

import json

from torchspec.data.templates import ChatTemplate, RoleFormat

__all__ = ["template_to_jinja"]


def template_to_jinja(template: ChatTemplate) -> str:
    """A Jinja chat template (``apply_chat_template`` conventions) equivalent to ``template.render``."""
    q = json.dumps  # a JSON string literal is also a valid Jinja string literal
    lines = [
        f"{{{{- {q(template.bos)} -}}}}",
        f"{{%- set default_system = {q(template.default_system_prompt or '')} -%}}",
        "{%- if default_system and (not messages or messages[0].role != 'system') -%}",
        f"{{{{- {q(template.system.header)} + default_system + {q(template.system.footer)} -}}}}",
        "{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- if message.role == 'system' -%}",
        _wrap(template.system),
        "{%- elif message.role == 'user' -%}",
        _wrap(template.user),
        "{%- elif message.role == 'tool' -%}",
        _wrap(template.tool)
        if template.tool is not None
        else f"{{{{- raise_exception({q('template ' + template.name + ' has no tool role')}) -}}}}",
        "{%- elif message.role == 'assistant' -%}",
        f"{{{{- {q(template.assistant_header)} -}}}}",
    ]
    if template.reasoning is not None:
        reasoning = template.reasoning
        lines += [
            "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}",
            "{%- if reasoning | trim -%}",
            f"{{{{- {q(reasoning.open)} + reasoning + {q(reasoning.close)} -}}}}",
            "{%- else -%}",
            f"{{{{- {q(reasoning.empty)} -}}}}",
            "{%- endif -%}",
        ]
    last_end = template.last_end_of_turn if template.last_end_of_turn is not None else template.end_of_turn
    lines += [
        f"{{{{- {q(template.content_prefix)} + message.content -}}}}",
        f"{{%- if loop.last -%}}{{{{- {q(last_end)} -}}}}",
        f"{{%- else -%}}{{{{- {q(template.end_of_turn)} -}}}}{{%- endif -%}}",
        f"{{{{- {q(template.after_end_of_turn)} -}}}}",
        "{%- else -%}",
        "{{- raise_exception('unknown role: ' + message.role) -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        f"{{{{- {q(template.generation_prompt)} -}}}}",
        "{%- endif -%}",
    ]
    return "\n".join(lines)


def _wrap(role: RoleFormat) -> str:
    return f"{{{{- {json.dumps(role.header)} + message.content + {json.dumps(role.footer)} -}}}}"

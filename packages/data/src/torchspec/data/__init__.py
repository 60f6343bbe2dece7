"""Chat-template tokenization with assistant-only loss masks, datasets and vocab mapping for EAGLE-3 drafts."""

from torchspec.data.__about__ import __version__
from torchspec.data.conversation import normalize_conversation
from torchspec.data.errors import DataError
from torchspec.data.jinja_template import template_to_jinja
from torchspec.data.loading import load_conversation_dataset
from torchspec.data.local_tokenizer import build_local_tokenizer
from torchspec.data.sample_data import sample_conversations_path
from torchspec.data.templates import ChatTemplate, ReasoningFormat, RoleFormat, get_template, list_templates
from torchspec.data.tokenization import tokenize_conversation
from torchspec.data.training_dataset import DatasetStats, build_training_dataset
from torchspec.data.vocab_mapping import VocabMapping, build_vocab_mapping, count_supervised_tokens, coverage_report

__all__ = [
    "ChatTemplate",
    "DataError",
    "DatasetStats",
    "ReasoningFormat",
    "RoleFormat",
    "VocabMapping",
    "__version__",
    "build_local_tokenizer",
    "build_training_dataset",
    "build_vocab_mapping",
    "count_supervised_tokens",
    "coverage_report",
    "get_template",
    "list_templates",
    "load_conversation_dataset",
    "normalize_conversation",
    "sample_conversations_path",
    "template_to_jinja",
    "tokenize_conversation",
]

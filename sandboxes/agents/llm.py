"""The agent's LLM, configured from the environment.

=======================  ==============================================================
variable                 meaning
=======================  ==============================================================
``NAMEK_LLM_PROVIDER``   openai, anthropic, google, ollama, groq, mistral, deepseek,
                         openrouter or azure; default ``openai`` when any other
                         variable is set (an OpenAI-compatible endpoint, e.g. LiteLLM)
``NAMEK_LLM_MODEL``      the model name, required once anything is configured
``NAMEK_LLM_BASE_URL``   the endpoint (OpenAI-compatible API, Ollama host, Azure endpoint)
``NAMEK_LLM_API_KEY``    the key; without it the provider's SDK reads its usual variable
                         (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ...)
=======================  ==============================================================

``chat_model_from_env`` returns None when none of them is set. browser-use is imported
only when a model is built (after ``prepare_browser_use_env``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from browser_use.llm.base import BaseChatModel

VARIABLES = ("NAMEK_LLM_PROVIDER", "NAMEK_LLM_MODEL", "NAMEK_LLM_BASE_URL", "NAMEK_LLM_API_KEY")


def chat_model_from_env(environ: Mapping[str, str]) -> BaseChatModel | None:
    """The chat model the ``NAMEK_LLM_*`` variables describe, or None when none is set.

    Raises ValueError, naming the variable, for an unknown provider or a missing model.
    """
    values = {name: (environ.get(name) or "").strip() for name in VARIABLES}
    if not any(values.values()):
        return None
    provider = values["NAMEK_LLM_PROVIDER"].lower() or "openai"
    if provider not in _CLASSES:
        raise ValueError(
            f"NAMEK_LLM_PROVIDER={values['NAMEK_LLM_PROVIDER']!r} is not supported; use one of {', '.join(_CLASSES)}"
        )
    model = values["NAMEK_LLM_MODEL"]
    if not model:
        raise ValueError(f"NAMEK_LLM_MODEL is not set: the {provider} provider needs a model name")
    base_url = values["NAMEK_LLM_BASE_URL"] or None
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise ValueError(f"NAMEK_LLM_BASE_URL={base_url!r} must be an http:// or https:// URL")
    api_key = values["NAMEK_LLM_API_KEY"] or None
    return _build(provider, model, base_url, api_key)


def _build(provider: str, model: str, base_url: str | None, api_key: str | None) -> BaseChatModel:
    if provider == "ollama" and api_key is not None:
        raise ValueError("NAMEK_LLM_API_KEY is not used by the ollama provider: leave it unset")
    module_name, class_name, endpoint_parameter = _CLASSES[provider]
    module = importlib.import_module(f"browser_use.llm.{module_name}.chat")
    parameters: dict[str, Any] = {"model": model}
    if api_key is not None:
        parameters["api_key"] = api_key
    if base_url is not None:
        if provider == "google":
            parameters["http_options"] = {"base_url": base_url}
        else:
            parameters[endpoint_parameter] = base_url
    if provider == "openai":
        # browser-use's default of 5 retries with backoff, times the agent's own failure
        # budget, keeps a run on a dead endpoint alive for minutes before it fails.
        parameters["max_retries"] = OPENAI_RETRIES
    chat_model: BaseChatModel = getattr(module, class_name)(**parameters)
    return chat_model


OPENAI_RETRIES = 2

# provider: (module under browser_use.llm, class, the parameter NAMEK_LLM_BASE_URL goes to)
_CLASSES = {
    "openai": ("openai", "ChatOpenAI", "base_url"),
    "anthropic": ("anthropic", "ChatAnthropic", "base_url"),
    "google": ("google", "ChatGoogle", "http_options"),
    "ollama": ("ollama", "ChatOllama", "host"),
    "groq": ("groq", "ChatGroq", "base_url"),
    "mistral": ("mistral", "ChatMistral", "base_url"),
    "deepseek": ("deepseek", "ChatDeepSeek", "base_url"),
    "openrouter": ("openrouter", "ChatOpenRouter", "base_url"),
    "azure": ("azure", "ChatAzureOpenAI", "azure_endpoint"),
}

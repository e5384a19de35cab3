"""What the HTTP APIs speak besides plain text: request schemas, tool calls, reasoning and grammars.

`openai` and `anthropic` turn requests into one `ChatPlan` (template messages, grammar, thinking)
and replies back into each API's objects; `reply` splits generated text into reasoning, content and
tool calls as it streams; `tools` knows the tool-call formats of chat templates; `grammar` writes
llama.cpp grammars (GBNF) that make tool calls and JSON replies valid by construction.
"""

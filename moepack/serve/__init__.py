"""Using a pack from other programs and from the terminal: the OpenAI-compatible server (``moepack serve``)
and the chat REPL (``moepack chat``)."""

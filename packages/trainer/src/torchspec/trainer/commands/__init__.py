"""The user commands besides ``train``: evaluate, verify, regenerate, dump-states, and the default
assets the first hour runs on."""

"""Where the target's hidden states come from: the contract every target fulfils (``contract``), the
target in this process (``in_process``), its head alone (``head``), a vLLM engine (``engine``), a
dump on disk (``dump``), and the one factory that builds the configured one (``factory``)."""

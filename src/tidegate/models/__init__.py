"""Model lifecycle: configuration to loaded runtimes."""

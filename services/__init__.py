"""termtune's services: the control plane, the four stage workers and the CLI."""

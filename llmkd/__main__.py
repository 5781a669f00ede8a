"""`python -m llmkd COMMAND ...`, the same as the `llmkd` console command (`llmkd.commands`)."""

from llmkd.commands import main

main()

from modelfuse.cli import run

run()

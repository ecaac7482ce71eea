from hauler.cli.main import app

app(prog_name="hauler")

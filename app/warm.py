"""The modules every compute worker imports before it says it is ready (the encoders: a fresh
install's first tile otherwise spent 0.6 s importing them), and the server itself while the
catalog opens (app.main's start-up thread). A module of its own so the command line can start
the compute forkserver with them before it imports the app."""

WARM_MODULES = ("app.encoders", "rio_tiler.colormap", "rio_tiler.utils")

"""Pure torch + stdlib math and small state machines. Nothing here imports Lightning."""

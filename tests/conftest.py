"""Suite-wide settings: one torch thread per test process.

`make test` runs two pytest workers on two cores; more threads than cores makes small
convolutions many times slower, not faster."""

import torch

torch.set_num_threads(1)

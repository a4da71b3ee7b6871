"""TFDS mock data for ``tfds.data_source`` (shared by the data and trainer tests)."""

import contextlib
from unittest import mock


@contextlib.contextmanager
def mock_tfds(num_examples):
  """tfds.testing.mock_data for ``tfds.data_source``.

  tensorflow-datasets 4.9.10's mock sets ``__getitems__`` on a MagicMock as a plain partial, so it is called
  without ``self`` and fails; route it to the mock's own deterministic example generator.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking
  getitems = lambda keys, generator, serialized=False: [generator[k] for k in keys]
  with mock.patch.object(mocking, "_getitems", getitems), \
       tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
    yield

"""Helpers shared by the test files."""
import io
import tarfile


def read_shard(path):
    """{key: {ext: bytes}} straight from a tar, without webdataset."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split('.', 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def write_tar(path, samples):
    """A webdataset shard of [(key, {ext: bytes})]."""
    with tarfile.open(path, 'w') as tar:
        for key, files in samples:
            for ext, blob in files.items():
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))

# Portable check of a signed model package (microfed.package): imported by
# tests/test_package.py under CPython (the expected answer) and run under the MicroPython unix
# port as a script (one JSON case on stdin, the JSON result on stdout); hil/test_portable_vectors.py
# sends the same function to a board. A case: {"pkg": hex, "pub": hex, "x": features,
# "flips": byte indices}. The result: [n params, the first three, the prediction for x, then
# per flip (one bit of that byte) the rejection reason, or "accepted"].
import binascii
import json
import sys

from microfed import ed25519, package


def package_case(c):
    data = binascii.unhexlify(c["pkg"])
    pub = binascii.unhexlify(c["pub"])
    mdl, params = package.load_for_inference(data, pub, ed25519.verify)
    out = [len(params), params[:3], mdl.predict(params, c["x"])]
    for i in c["flips"]:
        bad = bytearray(data)
        bad[i] ^= 1 << (i % 8)
        try:
            package.verify(bytes(bad), pub, ed25519.verify)
            out.append("accepted")
        except package.PackageError as e:
            out.append(e.reason)
    return out


def main():
    sys.stdout.write(json.dumps(package_case(json.loads(sys.stdin.read()))))


if __name__ == "__main__":
    main()

// SHA-256 (FIPS 180-4) of a byte string, as lowercase hex: the results file's
// bundle_manifest_sha256. Written here for the reason json.hpp gives: no crypto library is
// common to the host, Android's NDK and the ExecuTorch package.
#pragma once

#include <string>

namespace harness {

std::string sha256_hex(const std::string& bytes);

}  // namespace harness

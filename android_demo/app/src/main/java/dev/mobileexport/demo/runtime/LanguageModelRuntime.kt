// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.runtime

import dev.mobileexport.demo.bundle.BundleFiles

/** The runtime interface of mobile-export (mobile_export/runtimes/base.py, harness/src/runtime.hpp):
 * load an artifact, feed tokens at a position, read the last token's logits. A sequence starts at
 * position 0; the caches are overwritten from there. */
interface LanguageModelRuntime : AutoCloseable {
    val name: String
    val maxSeqLen: Int
    fun load()
    fun step(tokens: IntArray, startPos: Int): FloatArray
}

/** The runtime for a bundle's artifact format (manifest `artifact.format`). */
fun openRuntime(bundle: BundleFiles): LanguageModelRuntime = when (bundle.format) {
    "executorch-pte" -> ExecuTorchRuntime(bundle)
    "onnxruntime-genai" -> OnnxGenAIRuntime(bundle)
    else -> throw IllegalArgumentException("this app runs executorch-pte and onnxruntime-genai bundles, not ${bundle.format}")
}

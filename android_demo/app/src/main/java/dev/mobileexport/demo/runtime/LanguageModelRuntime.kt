// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.runtime

import dev.mobileexport.demo.bundle.BundleFiles

/** What one step gave: the greedy next token, and the last token's logits where the runtime's
 * API exposes them (ONNX Runtime GenAI's Java API does not: then [logits] is null and the
 * reference check compares tokens only, as device_tests/HARNESS.md allows). */
class Step(val token: Int, val logits: FloatArray?)

/** The runtime interface of mobile-export (mobile_export/runtimes/base.py, harness/src/runtime.hpp):
 * load an artifact, feed tokens at a position, read the next token (and logits). A sequence starts
 * at position 0; the caches are overwritten from there. */
interface LanguageModelRuntime : AutoCloseable {
    val name: String
    val maxSeqLen: Int
    fun load()
    fun step(tokens: IntArray, startPos: Int): Step
}

fun argmax(row: FloatArray): Int = row.indices.maxByOrNull { row[it] }!!

/** The runtime for a bundle's artifact format (manifest `artifact.format`). */
fun openRuntime(bundle: BundleFiles): LanguageModelRuntime = when (bundle.format) {
    "executorch-pte" -> ExecuTorchRuntime(bundle)
    "onnxruntime-genai" -> OnnxGenAIRuntime(bundle)
    else -> throw IllegalArgumentException("this app runs executorch-pte and onnxruntime-genai bundles, not ${bundle.format}")
}

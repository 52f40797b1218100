// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.runtime

import dev.mobileexport.demo.bundle.BundleFiles
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/** A bundle's model.pte in ExecuTorch's Android runtime: forward(tokens [1, T] int64, input_pos [1] int64)
 * returns the last token's logits; the KV cache lives in the program. */
class ExecuTorchRuntime(private val bundle: BundleFiles) : LanguageModelRuntime {
    override val name = "executorch"
    override val maxSeqLen: Int get() = bundle.contextLength
    private var module: Module? = null

    override fun load() {
        module = Module.load(bundle.artifact.absolutePath).also { it.loadMethod("forward") }
    }

    override fun step(tokens: IntArray, startPos: Int): Step {
        require(startPos + tokens.size <= maxSeqLen) { "sequence exceeds the model's context of $maxSeqLen" }
        val ids = Tensor.fromBlob(LongArray(tokens.size) { tokens[it].toLong() }, longArrayOf(1, tokens.size.toLong()))
        val pos = Tensor.fromBlob(longArrayOf(startPos.toLong()), longArrayOf(1))
        val out = checkNotNull(module) { "load() first" }.forward(EValue.from(ids), EValue.from(pos))
        val logits = out[0].toTensor().dataAsFloatArray
        val vocab = out[0].toTensor().shape().last().toInt()
        val last = logits.copyOfRange(logits.size - vocab, logits.size)
        return Step(argmax(last), last)
    }

    override fun close() {
        module?.destroy()
        module = null
    }
}

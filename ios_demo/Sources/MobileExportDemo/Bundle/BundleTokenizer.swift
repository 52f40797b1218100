// Never compiled: written without Xcode (see ios_demo/README.md).
import Foundation
import Tokenizers

/// One message of a chat, as chat templates take it (`role`: "user" / "assistant" / "system").
public struct ChatTurn: Identifiable, Sendable {
    public let id = UUID()
    public let role: String
    public var text: String

    public init(role: String, text: String) {
        self.role = role
        self.text = text
    }
}

/// The bundle's tokenizer (`tokenizer.json` and its companions) through swift-transformers'
/// `Tokenizers`, loaded from a private copy of exactly the files the manifest lists under
/// `tokenizer.files`, so nothing else in the folder is ever read.
public final class BundleTokenizer: @unchecked Sendable {
    private let tokenizer: any Tokenizer
    private let bundle: BundleManifest

    private init(tokenizer: any Tokenizer, bundle: BundleManifest) {
        self.tokenizer = tokenizer
        self.bundle = bundle
    }

    public static func load(_ bundle: BundleManifest) async throws -> BundleTokenizer {
        let names = bundle.tokenizerFiles.map(\.lastPathComponent)
        guard names.contains("tokenizer.json") else {
            throw MobileExportError("the bundle lists no tokenizer.json under tokenizer.files")
        }
        let files = FileManager.default
        let copy = files.temporaryDirectory.appendingPathComponent("mobile-export-tokenizer-\(UUID().uuidString)")
        try files.createDirectory(at: copy, withIntermediateDirectories: true)
        defer { try? files.removeItem(at: copy) }
        for file in bundle.tokenizerFiles {
            try files.copyItem(at: file, to: copy.appendingPathComponent(file.lastPathComponent))
        }
        let tokenizer = try await AutoTokenizer.from(modelFolder: copy)
        return BundleTokenizer(tokenizer: tokenizer, bundle: bundle)
    }

    /// The prompt for the assistant's next reply: the manifest's chat template over the whole
    /// conversation when the bundle has one; otherwise the text encoded as is, with BOS in front
    /// when the manifest says the tokenizer adds one.
    public func promptTokens(for conversation: [ChatTurn]) throws -> [Int32] {
        var ids: [Int]
        if let template = bundle.chatTemplate {
            ids = try tokenizer.applyChatTemplate(
                messages: conversation.map { ["role": $0.role, "content": $0.text] }, chatTemplate: template
            )
        } else {
            ids = tokenizer.encode(text: conversation.map(\.text).joined(separator: "\n"))
            if bundle.addBos, let bos = bundle.bosId, ids.first != bos { ids.insert(bos, at: 0) }
        }
        return ids.map { Int32($0) }
    }

    /// Text of generated ids (special tokens such as end-of-turn are never passed in).
    public func decode(_ ids: [Int]) -> String {
        tokenizer.decode(tokens: ids)
    }
}
